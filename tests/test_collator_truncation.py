"""The collator's max_length cut, its token alignment and its input checks, against expectations built independently:
a row cut after its second answer must equal the same chat collated with only its first two turns."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from helpers import shared_model
from PIL import Image

from peft_vision_lora.data import IGNORE_INDEX, RECIPES, VisionChatCollator
from peft_vision_lora.data.collator import _align
from peft_vision_lora.testing import build_processor
from peft_vision_lora.testing.processors import _CONTENT, QWEN_TEMPLATE

RED, BLUE = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))


def _user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _chat(turns: int, image: bool = True) -> dict:
    """Up to three question/answer turns, the image (if any) in the first question."""
    messages = [
        _user("What colour is the square?", images=int(image)),
        _assistant("a red square on a white background"),
        _user("And the background?"),
        _assistant("white"),
        _user("Describe the image in many words please, as long as you can."),
        _assistant("a red square on a white background with a blue circle on a black background beside it"),
    ]
    return {"images": [RED] if image else [], "messages": messages[: 2 * turns]}


def _answer_ends(labels: torch.Tensor) -> list[int]:
    trained = (labels != IGNORE_INDEX).tolist()
    return [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]


def _assert_same_batch(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        if key == "cross_attention_mask":  # Mllama's processor lets padding see the images; the cut pads with 0
            real = expected["attention_mask"][:, :, None, None]
            assert (actual[key] * real).equal(expected[key] * real) and not (actual[key] * (1 - real)).any()
        else:
            assert actual[key].equal(expected[key]), key


# --- _align: text-only tokens -> processed tokens, by hand -----------------------------------------------------------


def _mapped(plain: list[int], processed: list[int]) -> tuple[list[int], list[int]]:
    position, extra = _align(plain, processed)
    return [position(i) for i in range(len(plain) + 1)], extra.tolist()


@pytest.mark.parametrize(
    ("plain", "processed", "positions", "extra"),
    [
        # an image placeholder expanded to three tokens: the first matches, the other two were inserted
        ([1, 9, 2, 3], [1, 9, 9, 9, 2, 3], [0, 1, 4, 5, 6], [2, 3]),
        # the walk matches the earliest token: repeated tokens keep their order
        ([9, 9], [9, 9, 9], [0, 1, 3], [2]),
        ([5], [5, 7, 5], [0, 3], [1, 2]),
        ([9, 4], [9, 5, 9, 9, 4], [0, 4, 5], [1, 2, 3]),
        ([], [9, 9], [2], [0, 1]),
        # a processor that rewrites a token: the diff aligns the rest, an unmatched token maps to the next matched one
        ([1, 2, 3, 4], [1, 2, 8, 4, 9], [0, 1, 3, 3, 5], [2, 4]),
        ([1, 2, 3, 4, 5], [1, 8, 8, 4, 5], [0, 3, 3, 3, 4, 5], [1, 2]),
        ([1, 2, 3], [1, 2, 9], [0, 1, 3, 3], [2]),
        ([3, 1, 2], [1, 2], [0, 0, 1, 2], []),
    ],
)
def test_align_maps_text_tokens_and_finds_inserted_ones(plain, processed, positions, extra):
    assert _mapped(plain, processed) == (positions, extra)


def test_align_of_a_long_rewritten_row_keeps_frequent_tokens():
    """difflib's autojunk would drop a token that makes up over 1% of a 200+ token row (a space, a newline)."""
    plain, processed = [1] + [7] * 250, [2] + [7] * 250
    positions, extra = _mapped(plain, processed)
    assert positions == [1, *range(1, 252)] and extra == [0]


# --- max_length ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "mllama", "gemma3", "idefics3"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cut_row_equals_the_chat_collated_without_its_last_turn(model_type, padding_side):
    """A batch of a short row, a three-turn chat longer than max_length and a text-only row whose first answer alone
    ends past max_length: the chat is cut after its second answer, the text-only row is dropped with a warning, and
    the result is exactly the processor's batch of the short row and the two-turn chat (padding included)."""
    processor = build_processor(model_type)
    processor.tokenizer.padding_side = padding_side
    processor.tokenizer.pad_token = processor.tokenizer.convert_ids_to_tokens(3)  # a pad id that is not 0
    short = {"images": [BLUE], "messages": [_user("What colour?", images=1), _assistant("blue")]}
    long_answer = {"images": [], "messages": [_user("Hi"), _assistant(" ".join(["red square white"] * 60))]}
    if not RECIPES[model_type].text_only_rows:
        long_answer = {**long_answer, "images": [BLUE], "messages": [_user("Hi", 1), long_answer["messages"][1]]}
    expected = VisionChatCollator(processor)([short, _chat(2)])
    full = VisionChatCollator(processor)([short, _chat(3)])
    ends = _answer_ends(full["labels"][1][full["attention_mask"][1] == 1])
    assert len(ends) == 3 and ends[1] == int(expected["attention_mask"][1].sum())
    assert int(expected["attention_mask"][0].sum()) < ends[1], "the short row must fit"
    for limit in (ends[1], ends[2] - 1):  # exactly the second answer's end, and one token short of the third's
        collator = VisionChatCollator(processor, max_length=limit)
        _assert_same_batch(collator([short, _chat(3)]), expected)
        with pytest.warns(UserWarning, match=r"Dropped batch rows \[1\]: their images or first answer end past"):
            _assert_same_batch(collator([short, long_answer, _chat(3)]), expected)
    with torch.no_grad():
        assert torch.isfinite(shared_model(model_type)(**expected).loss)


def test_rows_that_fit_are_left_alone():
    processor = build_processor("qwen2_vl")
    processor.tokenizer.padding_side = "left"
    examples = [_chat(1), _chat(3)]
    plain = VisionChatCollator(processor)(examples)
    longest = int(plain["attention_mask"].sum(1).max())
    _assert_same_batch(VisionChatCollator(processor, max_length=longest)(examples), plain)


def test_max_length_one_is_valid_but_nothing_fits():
    collator = VisionChatCollator(build_processor("qwen2_vl"), max_length=1)
    with pytest.raises(ValueError, match=r"Every example of the batch needs more than max_length=1 tokens"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            collator([_chat(1)])
    with pytest.raises(ValueError, match="must be a positive number of tokens, got 0"):
        VisionChatCollator(build_processor("qwen2_vl"), max_length=0)


def test_paligemma_labels_the_suffix_and_drops_rows_past_max_length():
    """PaliGemma: labels are the answer tokens (token_type_ids 1) and <eos>; a system turn is left out of the prompt;
    a row longer than max_length cannot be cut (one answer) and is dropped."""
    processor = build_processor("paligemma")
    short = {"images": [RED], "messages": [_user("Colour?", 1), _assistant("red")]}
    answer = "a blue square on a white background"
    long = {"images": [BLUE], "messages": [_user("Describe it.", 1), _assistant(answer)]}
    batch = VisionChatCollator(processor)([short, long])
    ids, labels, types_, mask = batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "rows of different lengths must be padded"
    assert labels.equal(ids.masked_fill((types_ == 0) | (mask == 0), IGNORE_INDEX))
    for row, text in enumerate(["red", answer]):
        assert processor.tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX]) == text + "<eos>"
        text = processor.tokenizer.decode(ids[row][(types_[row] == 0) & (mask[row] == 1)])
        assert text.endswith(("Colour?", "Describe it.")[row] + "\n")
    system = {"role": "system", "content": "You are terse."}
    with_system = [{**e, "messages": [system, *e["messages"]]} for e in (short, long)]
    _assert_same_batch(VisionChatCollator(processor)(with_system), batch)

    lengths = mask.sum(1).tolist()
    _assert_same_batch(VisionChatCollator(processor, max_length=max(lengths))([short, long]), batch)
    with pytest.warns(UserWarning, match=r"Dropped batch rows \[1\]"):
        cut = VisionChatCollator(processor, max_length=max(lengths) - 1)([short, long])
    _assert_same_batch(cut, VisionChatCollator(processor)([short]))
    with pytest.raises(ValueError, match="^PaliGemma examples must be one user turn followed by one assistant turn"):
        VisionChatCollator(processor)([{**short, "messages": [*short["messages"], *_chat(2, False)["messages"][2:]]}])


# --- labels --------------------------------------------------------------------------------------------------------


class _Wrapped:
    """A processor from outside transformers (a user's wrapper): nothing in it says which family it is."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.chat_template = inner, inner.tokenizer, inner.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("named", [True, False, "from the model"])
def test_image_tokens_inside_an_answer_are_not_trained(named):
    """An assistant turn that shows an image: its placeholder tokens, named (by the family, also when only the model
    says which it is) or only found as inserted, stay -100."""
    processor = build_processor("qwen2_vl")
    answer = {"role": "assistant", "content": [{"type": "text", "text": "like"}, {"type": "image"}]}
    example = {"images": [RED, BLUE], "messages": [_user("Show me.", 1), answer]}
    collator = VisionChatCollator(processor)
    if named == "from the model":
        collator = VisionChatCollator(_Wrapped(processor), model=shared_model("qwen2_vl"))
        named = True
    if not named:
        collator.ignored_ids = torch.tensor([], dtype=torch.long)
    batch = collator([example])
    trained = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    vision_start, vision_end = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    like, end = processor.tokenizer(["like", "<|im_end|>\n"])["input_ids"]
    expected = like + end
    if not named:  # only the inserted copies are known: the framing and first placeholder are text tokens
        expected = like + [vision_start, processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"), vision_end] + end
    assert trained == expected
    with torch.no_grad():
        assert torch.isfinite(shared_model("qwen2_vl")(**batch).loss)


def test_consecutive_assistant_turns_are_trained_without_the_header_between_them():
    processor = build_processor("qwen2_vl")
    example = {"images": [], "messages": [_user("Hi"), _assistant("white"), _assistant("black")]}
    batch = VisionChatCollator(processor)([example])
    supervised = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "white<|im_end|>\nblack<|im_end|>\n"


def test_template_whose_prompt_merges_with_the_answer_is_refused():
    processor = build_processor("qwen2_vl")
    generation = "{% if add_generation_prompt %}<|im_start|>assistant\n"
    processor.chat_template = QWEN_TEMPLATE.replace(generation, "{% if add_generation_prompt %}<|im_start|>assist")
    with pytest.raises(
        ValueError,
        match=r"The qwen2_vl chat template's rendering up to turn 1 of example 0 is not a token prefix of the whole "
        r"conversation \(tokens merge across the boundary\), so the prompt cannot be masked\. End the generation "
        r"prompt with a special token or a newline\.",
    ):
        VisionChatCollator(processor)([_chat(1, image=False), _chat(1, image=False)])


# --- inputs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "key"), [("image", "path"), ("image_url", "url"), ("image_url", "image")])
def test_image_parts_may_carry_a_path_or_url(tmp_path, kind, key):
    processor = build_processor("llava")
    path = tmp_path / "red.png"
    RED.save(path)
    example = _chat(2)
    first = {"role": "user", "content": [{"type": kind, key: str(path)}, {"type": "text", "text": "Colour?"}]}
    inline = {"messages": [first, *example["messages"][1:]]}
    reference = {"images": [RED], "messages": [_user("Colour?", 1), *example["messages"][1:]]}
    _assert_same_batch(VisionChatCollator(processor)([inline]), VisionChatCollator(processor)([reference]))


def test_input_errors_name_the_example_and_the_fix():
    processor = build_processor("llava")
    collator = VisionChatCollator(processor)
    good = _chat(1)
    with pytest.raises(ValueError, match="^Example 1 of the batch needs `messages` ending with an assistant turn"):
        collator([good, {**good, "messages": good["messages"][:1]}])
    two = {"images": [RED], "messages": [_user("Both?", 2), _assistant("red")]}
    with pytest.raises(
        ValueError,
        match=r'^Example 1 has 2 image parts in its messages but 1 images; add one \{"type": "image"\} content part '
        r"per image, in order \(or load rows with load_chat_dataset\)\.$",
    ):
        collator([good, two])
    carried = {"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "Colour?"}]}
    with pytest.raises(
        ValueError,
        match=r"^Example 1 gives images both in `images` and inside its image parts: use one or the other\.$",
    ):
        collator([good, {"images": [RED], "messages": [carried, _assistant("red")]}])
    # string and missing contents hold no image parts
    text_rows = {"images": [], "messages": [{"role": "system"}, {"role": "user", "content": "Hi"}, _assistant("hi")]}
    assert VisionChatCollator(build_processor("qwen2_vl"))([text_rows])["input_ids"].shape[0] == 1


def test_processor_without_chat_template_is_refused_by_name():
    processor = build_processor("llava")
    processor.chat_template = None
    with pytest.raises(
        ValueError,
        match=r"^LlavaProcessor has no chat template: set processor.chat_template \(a Jinja string\) or load a "
        r"processor whose checkpoint has one\.$",
    ):
        VisionChatCollator(processor)
    with pytest.raises(ValueError, match="^SimpleNamespace has no chat template"):
        VisionChatCollator(types.SimpleNamespace())


def test_a_row_is_dropped_when_its_next_image_starts_right_at_the_cut():
    """Mllama writes one <|image|> per image; with user turns that open on their image, the second image's token is
    the very first one past the first answer: cutting there would keep two images' pixels for one placeholder."""
    processor = build_processor("mllama")
    processor.chat_template = _CONTENT + (
        "<|begin_of_text|>{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ content(message, '<|image|>') }}{% else %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ content(message, '') }}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    short = {"images": [BLUE], "messages": [_user("Colour?", 1), _assistant("blue")]}
    chat = {"images": [RED, BLUE], "messages": [_user("Colour?", 1), _assistant("red"), _user("And?", 1)]}
    chat["messages"].append(_assistant("blue"))
    full = VisionChatCollator(processor)([chat])
    ends = _answer_ends(full["labels"][0])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert full["input_ids"][0, ends[0]] == image_token, "the second image must follow the first answer at once"
    warning = (
        rf"^Dropped batch rows \[1\]: their images or first answer end past max_length={ends[0] + 2} tokens "
        r"\(an answer without its end-of-turn token, or image tokens without their image, would train wrongly\)\.$"
    )
    with pytest.warns(UserWarning, match=warning):
        dropped = VisionChatCollator(processor, max_length=ends[0] + 2)([short, chat])
    _assert_same_batch(dropped, VisionChatCollator(processor)([short]))
