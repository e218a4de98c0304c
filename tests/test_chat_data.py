"""load_chat_dataset: every source and format becomes the collator's rows; every bad row is reported with its row."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from peft_vision_lora.data import ChatDataError, VisionChatCollator, load_chat_dataset
from peft_vision_lora.testing import build_processor

QUESTION, ANSWER = "What colour is the square?", "red"


@pytest.fixture
def images(tmp_path):
    """Three distinguishable images on disk, in a subfolder (paths in the data are relative to it)."""
    folder = tmp_path / "img"
    folder.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, colour in enumerate(colours):
        Image.new("RGB" if i else "RGBA", (40, 30), colour).save(folder / f"{i}.png")  # one RGBA: comes out RGB
    return colours


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _user_parts(row):
    return [part["type"] for part in row["messages"][0]["content"]]


def _colour(image):
    return image.getpixel((0, 0))


CHAT_ROWS = [
    {  # image payload inside the part
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "img/0.png"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": ANSWER},
        ]
    },
    {  # bare image parts, images in the row; multi-turn
        "images": ["img/1.png", "img/2.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Two?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "no"},
        ],
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # text only
    {  # OpenAI-style image_url with a local path
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/2.png"}}]},
            {"role": "assistant", "content": "blue"},
        ]
    },
]


def test_chat_messages_jsonl_with_every_image_part_style(tmp_path, images):
    ds = load_chat_dataset(_write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["images", "messages"] and len(ds) == 4
    assert [len(row["images"]) for row in ds] == [1, 2, 0, 1]
    assert [_colour(image) for image in ds[1]["images"]] == [images[1], images[2]]  # in order
    assert ds[0]["images"][0].mode == "RGB" and _colour(ds[0]["images"][0]) == images[0]
    assert _user_parts(ds[0]) == ["image", "text"] and _user_parts(ds[3]) == ["image"]
    assert [m["role"] for m in ds[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ds[0]["messages"][1]["content"] == [{"type": "text", "text": ANSWER}]


def test_images_are_stored_as_paths_and_opened_only_when_a_row_is_read(tmp_path, images):
    ds = load_chat_dataset(_write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))[1]["images"]
    assert [item["bytes"] for item in raw] == [None, None]
    assert [item["path"] for item in raw] == [str(tmp_path / "img/1.png"), str(tmp_path / "img/2.png")]


def test_sharegpt_conversations_with_image_markers(tmp_path, images):
    rows = [
        {
            "id": "a",
            "image": "img/0.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": ANSWER},
            ],
        },
        {
            "images": ["img/1.png", "img/2.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image> and <image>: same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    ds = load_chat_dataset(path)
    assert ds[0]["messages"][0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": QUESTION}]
    assert [m["role"] for m in ds[1]["messages"]] == ["system", "user", "assistant"]
    assert [p["type"] for p in ds[1]["messages"][1]["content"]] == ["image", "text", "image", "text"]
    assert [_colour(image) for image in ds[1]["images"]] == [images[1], images[2]]
    assert ds[2]["images"] == [] and ds[2]["messages"][1]["content"][0]["text"] == "Hello"


def test_flat_columns_csv_parquet_and_column_mapping(tmp_path, images):
    csv_path = tmp_path / "flat.csv"
    csv_path.write_text(f"image,question,answer\nimg/0.png,{QUESTION},{ANSWER}\n,Say hi,hi\n")
    ds = load_chat_dataset(csv_path)
    assert _user_parts(ds[0]) == ["image", "text"] and _colour(ds[0]["images"][0]) == images[0]
    assert ds[1]["images"] == [] and ds[1]["messages"][1]["content"][0]["text"] == "hi"

    table = datasets.Dataset.from_dict({"pic": ["img/1.png"], "q": [QUESTION], "a": ["green"]})
    parquet = tmp_path / "flat.parquet"
    table.to_parquet(str(parquet))
    mapped = load_chat_dataset(parquet, columns={"image": "pic", "question": "q", "answer": "a"})
    assert _colour(mapped[0]["images"][0]) == images[1] and mapped[0]["messages"][1]["content"][0]["text"] == "green"


def test_imagefolder_and_in_memory_datasets(tmp_path, images):
    _write_jsonl(tmp_path / "img" / "metadata.jsonl", [{"file_name": "1.png", "prompt": "Colour?", "response": "g"}])
    folder = load_chat_dataset(tmp_path / "img")
    assert _colour(folder[0]["images"][0]) == images[1]

    pil = Image.new("RGB", (8, 8), (9, 9, 9))
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    in_memory = datasets.Dataset.from_dict({"image": [pil], "question": ["?"], "answer": ["grey"]}, features=features)
    ds = load_chat_dataset(in_memory)
    assert _colour(ds[0]["images"][0]) == (9, 9, 9)


def test_image_root_resolves_relative_paths(tmp_path, images):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"image": "0.png", "question": "?", "answer": "x"}]
    with pytest.raises(ChatDataError, match="image file not found"):
        load_chat_dataset(_write_jsonl(data / "d.jsonl", rows))
    ds = load_chat_dataset(data / "d.jsonl", image_root=tmp_path / "img")
    assert _colour(ds[0]["images"][0]) == images[0]


BAD_ROWS = [
    ({"image": "img/9.png", "question": "?", "answer": "x"}, "image", "image file not found"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/1.png"}}]}]},
        "messages[0].content[0]",
        "nothing is downloaded",
    ),
    ({"images": ["img/0.png"], "messages": CHAT_ROWS[2]["messages"]}, "images", "1 images but only 0 image parts"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
        "messages[0].content[0]",
        "image part without an image",
    ),
    (
        {
            "image": "img/0.png",
            "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "x"}],
        },
        "image",
        "1 images but 0 <image> markers",
    ),
    (
        {"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]},
        "conversations[0].value",
        "more <image> markers than the row has images",
    ),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "must end with an assistant turn"),
    ({"question": "?", "answer": ""}, "answer", "empty answer"),
]


@pytest.mark.parametrize(("bad", "field", "problem"), BAD_ROWS, ids=[p for _, _, p in BAD_ROWS])
def test_bad_rows_are_reported_with_row_field_and_problem(tmp_path, images, bad, field, problem):
    good = {"messages": CHAT_ROWS[2]["messages"]}
    if "question" in bad or "image" in bad and "conversations" not in bad:
        good = {"image": "img/0.png", "question": "?", "answer": "x"}
    if "conversations" in bad:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(ChatDataError, match=problem) as caught:
        load_chat_dataset(path)
    assert (caught.value.row, caught.value.field) == (2, field)
    assert str(caught.value).startswith(f"{path} row 2, field {field!r}")


def test_unknown_format_and_unreadable_sources_say_what_is_expected(tmp_path):
    with pytest.raises(ChatDataError, match="unknown format.*columns="):
        load_chat_dataset(_write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}]))
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 \\(row 1\\) is not valid JSON"):
        load_chat_dataset(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_chat_dataset(tmp_path)
    with pytest.raises(ValueError, match="supported data files"):
        load_chat_dataset(_write_jsonl(tmp_path / "x.txt", [{}]))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "idefics3", "mllama"])
def test_loaded_rows_collate_exactly_like_hand_built_rows(tmp_path, images, model_type):
    """The loader's rows and the same data written by hand (PIL images, bare image parts) give the same batch."""
    ds = load_chat_dataset(_write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:3]))
    opened = [Image.open(tmp_path / f"img/{i}.png").convert("RGB") for i in range(3)]
    by_hand = [
        {"images": [opened[0]], "messages": [_bare(CHAT_ROWS[0]["messages"][0]), _said(ANSWER)]},
        {"images": opened[1:], "messages": [CHAT_ROWS[1]["messages"][0], *CHAT_ROWS[1]["messages"][1:]]},
        {"images": [], "messages": CHAT_ROWS[2]["messages"]},
    ]
    collator = VisionChatCollator(build_processor(model_type))
    loaded, expected = collator([ds[i] for i in range(3)]), collator(by_hand)
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert loaded[key].equal(expected[key]), key


def _bare(message):
    parts = [{"type": "image"} if p["type"] == "image" else p for p in message["content"]]
    return {**message, "content": parts}


def _said(text):
    return {"role": "assistant", "content": text}
