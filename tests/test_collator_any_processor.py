"""The collator with processors as users load them: AutoProcessor round trips, inferred families, images processed
once, max_length and processor options."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import fresh_model
from PIL import Image
from transformers import AutoProcessor

from peft_vision_lora.data import (
    IGNORE_INDEX,
    PROCESSOR_MODEL_TYPES,
    RECIPES,
    VisionChatCollator,
    image_placeholder_ids,
    infer_model_type,
    load_processor,
)
from peft_vision_lora.testing import SyntheticVLMDataset, build_processor

MIXED = SyntheticVLMDataset("vqa", size=64, seed=3, text_only_fraction=0.3, max_images=2)


def _rows(counts: list[int]) -> list[dict]:
    pool = {n: [MIXED[i] for i in range(len(MIXED)) if len(MIXED[i]["images"]) == n] for n in (0, 1, 2)}
    return [pool[n].pop() for n in counts]


def _counts(model_type: str) -> list[int]:
    return [2, 0, 1] if RECIPES[model_type].text_only_rows else [2, 1, 1]


def _assert_same_batch(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].equal(expected[key]), key


@pytest.mark.parametrize("model_type", PROCESSOR_MODEL_TYPES)
def test_saved_processor_reloads_with_auto_processor_and_collates_the_same(tmp_path, model_type):
    """build_processor -> save_pretrained -> AutoProcessor.from_pretrained, with the family read off the class."""
    built = build_processor(model_type)
    built.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(built).__name__  # ImageOnlyQwen2VLProcessor for the video families
    assert not hasattr(loaded, "model_type")  # nothing but the class says which family it is
    assert infer_model_type(loaded) == model_type
    assert loaded.chat_template == built.chat_template
    examples = _rows(_counts(model_type))
    _assert_same_batch(VisionChatCollator(loaded)(examples), VisionChatCollator(built)(examples))


def test_image_only_processor_loads_in_a_fresh_process(tmp_path):
    """Only `import peft_vision_lora` is needed before AutoProcessor (no torchvision, no testing fixtures)."""
    build_processor("qwen2_vl").save_pretrained(tmp_path)
    code = (
        "import peft_vision_lora, sys; from transformers import AutoProcessor; "
        f"p = AutoProcessor.from_pretrained({str(tmp_path)!r}); print(type(p).__name__, p.image_processor.size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ImageOnlyQwen2VLProcessor")


def test_family_comes_from_the_model_when_the_processor_does_not_say(tmp_path):
    build_processor("llava").save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    model = fresh_model("llava")
    assert infer_model_type(object(), model) == "llava"
    assert VisionChatCollator(loaded, model=model).model_type == "llava"


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "llava_next", "idefics3", "gemma3", "mllama"])
def test_generic_recipe_gives_the_family_recipes_labels(model_type):
    """Families without a recipe get one list of images per row and image tokens from the processor's attributes;
    on the families that have a recipe, that gives the same batch."""
    processor = build_processor(model_type)
    examples = _rows(_counts(model_type))
    generic = VisionChatCollator(processor, model_type="some_new_vlm")
    assert generic.recipe not in RECIPES.values()
    _assert_same_batch(generic(examples), VisionChatCollator(processor)(examples))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "idefics3", "llava_next"])
def test_each_image_is_processed_once_per_batch(model_type, monkeypatch):
    processor = build_processor(model_type)
    seen = []
    preprocess = processor.image_processor.preprocess

    def counting(images, *args, **kwargs):
        flat = [i for row in images for i in (row if isinstance(row, list) else [row])]
        seen.extend(flat)
        return preprocess(images, *args, **kwargs)

    monkeypatch.setattr(processor.image_processor, "preprocess", counting)
    examples = [*_rows([2, 1]), *_rows([0, 2])]
    VisionChatCollator(processor)(examples)
    assert len(seen) == sum(len(e["images"]) for e in examples) == 5


def _long_chat(images: list[Image.Image]) -> dict:
    """A three-turn chat: image + question, answer, question, answer, image + question, answer."""
    user = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    return {
        "images": images,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "a red square on a white background"},
            {"role": "user", "content": "And the background?"},
            {"role": "assistant", "content": "white"},
            {"role": "user", "content": user[:1] + [{"type": "text", "text": "And here?"}]},
            {"role": "assistant", "content": "a blue circle on a black background"},
        ],
    }


def _turn_ends(labels: torch.Tensor) -> list[int]:
    trained = (labels != IGNORE_INDEX).tolist()
    return [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "mllama"])
def test_max_length_cuts_after_a_whole_answer_never_inside_image_tokens(model_type):
    processor = build_processor(model_type)
    short, *others = _rows([1, 1, 1])
    images = [row["images"][0] for row in others]
    full = VisionChatCollator(processor)([short, _long_chat(images)])
    ends = _turn_ends(full["labels"][1])
    image_ids = torch.tensor(sorted(image_placeholder_ids(processor)))
    last_image = int(torch.isin(full["input_ids"][1], image_ids).nonzero().max())
    # room for the first answer and a bit more, but not for the second image: the second answer must go too
    first_end = ends[0]
    limit = first_end + 3
    assert limit <= last_image < full["attention_mask"][1].sum(), "the case must cut before the second image"
    with pytest.warns(UserWarning, match=r"Dropped batch rows \[1\]"):
        dropped = VisionChatCollator(processor, max_length=limit)([short, _long_chat(images)])
    _assert_same_batch(dropped, VisionChatCollator(processor)([short]))
    # The same when the collator knows no image token by name (a new family): the tokens the processor inserted for
    # the second image are found by aligning the text-only tokens with the processed ones.
    # (Mllama's one <|image|> per image is not expanded: there, only its name marks it.)
    if model_type != "mllama":
        unnamed = VisionChatCollator(processor, max_length=limit)
        unnamed.ignored_ids = torch.tensor([], dtype=torch.long)
        with pytest.warns(UserWarning, match=r"Dropped batch rows \[1\]"):
            unnamed([short, _long_chat(images)])

    # Without the second image the same row is cut after its second answer (the last whole one that fits).
    chat = _long_chat(images[:1])
    chat["messages"][4]["content"] = "And here?"
    full = VisionChatCollator(processor)([chat])
    ends = _turn_ends(full["labels"][0])
    limit = ends[1] + 2  # a few tokens into the third turn
    cut = VisionChatCollator(processor, max_length=limit)([chat])
    assert cut["input_ids"].shape[1] == ends[1] <= limit
    assert cut["attention_mask"].all()
    for key in cut:
        if key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "cross_attention_mask"):
            assert cut[key].equal(full[key][:, : ends[1]]), key
        else:
            assert cut[key].equal(full[key]), key  # pixels untouched: every image token is still there
    assert _turn_ends(cut["labels"][0]) == ends[:2]  # both answers keep their end-of-turn token

    # A limit exactly at an answer's end keeps it; one token less keeps only the answers before.
    exact = VisionChatCollator(processor, max_length=ends[1])([chat])
    _assert_same_batch(exact, cut)
    shorter = VisionChatCollator(processor, max_length=ends[1] - 1)([chat])
    assert shorter["input_ids"].shape[1] == ends[0] and _turn_ends(shorter["labels"][0]) == ends[:1]

    model = fresh_model(model_type)
    loss = model(**cut).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_max_length_errors_when_nothing_fits_and_leaves_short_batches_alone():
    processor = build_processor("qwen2_vl")
    examples = _rows([1, 0])
    plain = VisionChatCollator(processor)(examples)
    _assert_same_batch(VisionChatCollator(processor, max_length=10_000)(examples), plain)
    with pytest.raises(ValueError, match="max_length=3 tokens for its images and first answer"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            VisionChatCollator(processor, max_length=3)(examples)
    with pytest.raises(ValueError, match="positive"):
        VisionChatCollator(processor, max_length=0)


def test_processor_kwargs_set_the_resolution_and_the_image_token_count():
    """Qwen2-VL's pixel budget: 4x the pixels, 4x the image tokens; the model runs on both."""
    processor = build_processor("qwen2_vl")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    example = {
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": "a red square"},
        ],
    }
    counts = {}
    for pixels in (32 * 32, 64 * 64):
        size = {"shortest_edge": 16 * 16, "longest_edge": pixels}
        batch = VisionChatCollator(processor, processor_kwargs={"size": size})([example])
        counts[pixels] = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        assert batch["pixel_values"].shape[0] == counts[pixels] * 4  # 2x2 patches merge into one token
        answer = processor.tokenizer("a red square<|im_end|>\n")["input_ids"]  # the template ends turns with "\n"
        assert batch["labels"][batch["labels"] != IGNORE_INDEX].tolist() == answer
        fresh_model("qwen2_vl")(**batch).loss.backward()
    assert counts == {32 * 32: 4, 64 * 64: 16}


def test_images_inside_content_parts_are_taken(tmp_path):
    """{"type": "image", "image": PIL | path} parts without an `images` field (the case the issue hit)."""
    processor = build_processor("llava")
    example = _rows([1])[0]
    path = tmp_path / "x.png"
    example["images"][0].save(path)
    for payload in (example["images"][0], str(path)):
        parts = [{"type": "image", "image": payload}, *example["messages"][0]["content"][1:]]
        inline = {"messages": [{"role": "user", "content": parts}, *example["messages"][1:]]}
        _assert_same_batch(VisionChatCollator(processor)([inline]), VisionChatCollator(processor)([example]))
    with pytest.raises(ValueError, match="both in `images` and inside its image parts"):
        VisionChatCollator(processor)([{**inline, "images": example["images"]}])


def test_processor_without_chat_template_is_refused():
    processor = build_processor("llava")
    processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        VisionChatCollator(processor)


def test_load_processor_falls_back_to_image_only_for_a_checkpoints_own_processor(tmp_path):
    """A real Qwen2-VL checkpoint names `Qwen2VLProcessor`, whose video half needs torchvision (absent here)."""
    import json

    build_processor("qwen2_vl").save_pretrained(tmp_path)
    config = tmp_path / "processor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "processor_class": "Qwen2VLProcessor"}))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(OSError, match="video processor"):
            AutoProcessor.from_pretrained(tmp_path)
    loaded = load_processor(tmp_path, max_pixels=64 * 64)
    assert infer_model_type(loaded) == "qwen2_vl" and loaded.image_processor.size.longest_edge == 64 * 64
    examples = _rows([1, 0])
    built = VisionChatCollator(
        build_processor("qwen2_vl"), processor_kwargs={"size": dict(loaded.image_processor.size)}
    )
    _assert_same_batch(VisionChatCollator(loaded)(examples), built(examples))
