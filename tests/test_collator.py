"""Offline processors, the chat collator's label mask, and the synthetic tasks, on the real tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import shared_model

from peft_vision_lora.data import (
    IGNORE_INDEX,
    PROCESSOR_MODEL_TYPES,
    RECIPES,
    VisionChatCollator,
    image_placeholder_ids,
)
from peft_vision_lora.testing import SyntheticVLMDataset, build_processor
from peft_vision_lora.testing.processors import TINY_RECIPES
from peft_vision_lora.zoo.tiny import END_TOKEN, IMAGE_TOKEN, START_TOKEN, VIDEO_TOKEN, VOCAB

# Hand-written: the token each family's template closes an assistant turn with (it must be trained on, or the
# fine-tuned model never stops).
END_OF_TURN = {
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "llava": "</s>",
    "llava_next": "</s>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "paligemma": "<eos>",
    "gemma3": "<end_of_turn>",
    "mllama": "<|eot_id|>",
}
# Rows with 2, 0 and 1 images (PaliGemma cannot take a text-only row: 2, 1, 1).
MIXED = SyntheticVLMDataset("vqa", size=64, seed=3, text_only_fraction=0.3, max_images=2)


def _rows(counts: list[int]) -> list[dict]:
    pool = {n: [MIXED[i] for i in range(len(MIXED)) if len(MIXED[i]["images"]) == n] for n in (0, 1, 2)}
    return [pool[n].pop() for n in counts]


@pytest.fixture(scope="module", params=PROCESSOR_MODEL_TYPES)
def family(request):
    return request.param, build_processor(request.param)


def test_tokenizer_ids_fit_the_tiny_config(family):
    model_type, processor = family
    config = shared_model(model_type).config
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(tokenizer.image_token) == config.image_token_id == IMAGE_TOKEN
    assert max(tokenizer.get_vocab().values()) < len(tokenizer) and len(tokenizer.get_vocab()) >= VOCAB
    for name in ("vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id"):
        if getattr(config, name, None) is not None:  # Qwen2-VL and Gemma3 frame images with fixed ids
            assert getattr(config, name) in image_placeholder_ids(processor)
    text = "a red square on a white background"
    assert len(tokenizer(text)["input_ids"]) <= 10, "the trained BPE should cover the synthetic text compactly"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_placeholder_ids_are_exactly_the_tokens_that_stand_for_or_frame_images(family):
    """Every token the processor writes for an image, and nothing else, is found in the processor's own tokenizer."""
    model_type, processor = family
    spec = TINY_RECIPES[model_type].spec
    image_like = {t for key, t in spec.attributes.items() if key.endswith("_token")}
    image_like |= {t for i, t in spec.fixed.items() if i in (IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN)}
    expected = {processor.tokenizer.convert_tokens_to_ids(t) for t in image_like}
    assert image_placeholder_ids(processor) == expected
    assert set(TINY_RECIPES) == set(RECIPES), "every family the collator knows has an offline processor"


def test_labels_cover_exactly_the_answers_and_the_model_runs(family):
    model_type, processor = family
    counts = [2, 1, 1] if not RECIPES[model_type].text_only_rows else [2, 0, 1]
    examples = _rows(counts)
    batch = VisionChatCollator(processor)(examples)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "rows of different lengths must be padded"
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[torch.isin(ids, torch.tensor(sorted(image_placeholder_ids(processor))))] == IGNORE_INDEX).all()
    for row, example in enumerate(examples):
        supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert supervised.numel() > 0
        # one contiguous span at the end of the real tokens: the answer and the end-of-turn marker
        assert torch.equal(supervised, torch.arange(int(supervised[0]), int(supervised[-1]) + 1))
        text = processor.tokenizer.decode(labels[row, supervised])
        assert text.strip() == example["answer"] + END_OF_TURN[model_type]
        prompt = processor.tokenizer.decode(ids[row, : int(supervised[0])])
        assert example["messages"][0]["content"][-1]["text"].split()[0] in prompt
    with torch.no_grad():  # the model checks placeholder counts against its image features
        loss = shared_model(model_type)(**batch).loss
    assert torch.isfinite(loss)


def test_text_only_batch(family):
    model_type, processor = family
    if not RECIPES[model_type].text_only_rows:
        with pytest.raises(ValueError, match="at least one image"):
            VisionChatCollator(processor)(_rows([0]))
        return
    batch = VisionChatCollator(processor)(_rows([0, 0]))
    assert "pixel_values" not in batch
    with torch.no_grad():
        assert torch.isfinite(shared_model(model_type)(**batch).loss)


def test_every_assistant_turn_is_trained_in_multi_turn_chats():
    processor = build_processor("qwen2_vl")
    first, second = MIXED[0], _rows([1])[0]
    messages = second["messages"] + [
        {"role": "user", "content": [{"type": "text", "text": "What is 2 plus 2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    ]
    batch = VisionChatCollator(processor)([{"images": second["images"], "messages": messages}, first])
    supervised = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == f"{second['answer']}<|im_end|>\n4<|im_end|>\n"


def test_collator_errors_say_what_to_fix():
    collator = VisionChatCollator(build_processor("llava"))
    example = _rows([1])[0]
    with pytest.raises(ValueError, match="1 image parts in its messages but 0 images"):
        collator([{**example, "images": []}])
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        collator([{**example, "messages": example["messages"][:1]}])
    with pytest.raises(ValueError, match="AutoProcessor.from_pretrained"):
        build_processor(shared_model("llava").config.__class__(vocab_size=32000))


def test_synthetic_examples_are_deterministic_and_cover_each_task():
    for task in ("captioning", "ocr", "vqa", "domain_adaptation"):
        a, b = SyntheticVLMDataset(task, size=4, seed=7), SyntheticVLMDataset(task, size=4, seed=7)
        assert a[2]["answer"] == b[2]["answer"]
        assert a[2]["images"][0].tobytes() == b[2]["images"][0].tobytes()
        assert SyntheticVLMDataset(task, size=8, seed=8)[2]["images"][0].tobytes() != a[2]["images"][0].tobytes()
    assert SyntheticVLMDataset("ocr", size=4)[0]["answer"].isdigit()
    # the same scenes, seen through the colour shift: same captions, different pixels
    plain, shifted = SyntheticVLMDataset("captioning", size=4), SyntheticVLMDataset("domain_adaptation", size=4)
    assert plain[1]["answer"] == shifted[1]["answer"]
    assert plain[1]["images"][0].tobytes() != shifted[1]["images"][0].tobytes()
    counts = {len(MIXED[i]["images"]) for i in range(len(MIXED))}
    assert counts == {0, 1, 2}
    with pytest.raises(ValueError, match="Unknown synthetic task"):
        SyntheticVLMDataset("segmentation")
