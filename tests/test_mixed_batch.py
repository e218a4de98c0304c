"""Mixed-adapter batches (`adapter_names`): each row equals a run of that row with its adapter alone.

Two adapters of different ranks and components (one on vision + projector + language, one vision-only) and
`__base__` rows, on every tiny family; rows with several images and none (LLaVA-Next: of different sizes); generate
with greedy and beam search, tokens and scores; the torch and Triton (interpreter) kernels; and the refusals.
"""

from __future__ import annotations

import pytest
import torch
from helpers import fresh_model, model_type_params
from peft import get_peft_model

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.resolve.batch_rows import MIXED_BATCH_MODEL_TYPES, MixedBatchError
from peft_vision_lora.testing.mixed_batch import MULTI_IMAGE_MODEL_TYPES, multi_image_batch
from peft_vision_lora.zoo.tiny import SUPPORTED_TINY_MODEL_TYPES, tiny_inputs

NO_PROJECTOR_LINEAR = ("gemma3",)  # its projector has no linear layer
NEEDS_AN_IMAGE = ("blip-2", "kosmos-2")  # their forward cannot run a row without an image


def _two_adapters(model_type: str, kernel: str = "auto"):
    """Adapter "full" (r=4: vision, projector, language) and "vis" (r=2, scale 16: vision only); random B."""
    common = {"init_lora_weights": False, "kernel": kernel}
    full = VisionLoraConfig(
        r=4,
        lora_alpha=8,
        finetune_projector=model_type not in NO_PROJECTOR_LINEAR,
        finetune_vision_layers=True,
        **common,
    )
    vis = VisionLoraConfig(
        r=2,
        lora_alpha=32,  # scale 16: BLIP-2 and Kosmos-2 read the tower through a few query tokens only
        finetune_vision_layers=True,
        finetune_language_layers=False,
        finetune_projector=False,
        **common,
    )
    model = get_peft_model(fresh_model(model_type), full, adapter_name="full")
    model.add_adapter("vis", vis)
    return model.eval()


def _alone(model, name: str, batch: dict, method: str = "forward", **kwargs):
    """`name` alone on `batch`: set_adapter, or adapters disabled for `__base__`."""
    run = model if method == "forward" else model.generate
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return run(**batch, **kwargs)
        model.set_adapter(name)
        return run(**batch, **kwargs)


def _assert_rows_match(model, batch: dict, singles: list[dict], names: list[str]) -> None:
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
    for row, (name, single) in enumerate(zip(names, singles)):
        expected = _alone(model, name, single).logits[0]
        torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    # the adapters must matter, or equality proves nothing
    full = _alone(model, "full", singles[0]).logits[0]
    assert not torch.allclose(full, _alone(model, "__base__", singles[0]).logits[0], atol=1e-3)


def _rows_alone(batch: dict) -> list[dict]:
    size = batch["input_ids"].shape[0]
    if batch["pixel_values"].shape[0] != size and "image_grid_thw" not in batch:
        raise AssertionError("one image per row expected")
    singles = []
    for row in range(size):
        single = {}
        for key, value in batch.items():
            if key == "pixel_values" and "image_grid_thw" in batch:  # qwen: patches of image `row`
                per = batch["image_grid_thw"].prod(-1).tolist()
                value = value.split(per)[row]
                single[key] = value
            else:
                single[key] = value[row : row + 1]
        singles.append(single)
    return singles


@pytest.mark.parametrize("model_type", model_type_params())
def test_each_row_matches_its_adapter_alone(model_type):
    model = _two_adapters(model_type)
    batch = tiny_inputs(model, batch_size=3, seed=1)
    batch.pop("labels")
    _assert_rows_match(model, batch, _rows_alone(batch), ["vis", "__base__", "full"])


@pytest.mark.parametrize("model_type", model_type_params(MULTI_IMAGE_MODEL_TYPES))
def test_rows_with_several_images_and_none(model_type):
    model = _two_adapters(model_type)
    counts = [2, 1, 1, 1] if model_type in NEEDS_AN_IMAGE else [2, 0, 1, 1]
    batch, singles = multi_image_batch(model, counts)
    _assert_rows_match(model, batch, singles, ["vis", "full", "__base__", "full"])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("model_type", ["qwen2_vl", "mistral3"])  # patches flattened: per-row and per-token names
def test_kernels_in_a_mixed_batch(model_type, kernel):
    model = _two_adapters(model_type, kernel=kernel)
    batch, singles = multi_image_batch(model, [2, 0, 1])
    _assert_rows_match(model, batch, singles, ["vis", "full", "__base__"])


def _generated(model, name: str | list[str], batch: dict, num_beams: int):
    """Greedy or beam search, 4 new tokens, with scores: equal tokens alone could hide a wrong tower row."""
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0}
    settings |= {"output_scores": True, "return_dict_in_generate": True}
    if isinstance(name, list):
        with torch.no_grad():
            return model.generate(**batch, adapter_names=name, **settings)
    return _alone(model, name, batch, "generate", **settings)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("model_type", model_type_params())
def test_generate_rows_match_their_adapter_alone(model_type, num_beams):
    # Kosmos-2 and BLIP-2 run their tower in `generate`, outside the model's forward: the call's own inputs map it
    model = _two_adapters(model_type)
    counts = [2, 1, 1] if model_type in NEEDS_AN_IMAGE else [2, 0, 1]
    batch, singles = multi_image_batch(model, counts)
    names = ["vis", "full", "__base__"]
    mixed = _generated(model, names, batch, num_beams)
    for row, (name, single) in enumerate(zip(names, singles)):
        expected = _generated(model, name, single, num_beams)
        torch.testing.assert_close(mixed.sequences[row], expected.sequences[0], msg=f"row {row} ({name})")
        beams = slice(row * num_beams, (row + 1) * num_beams)
        for step, (got, want) in enumerate(zip(mixed.scores, expected.scores)):
            torch.testing.assert_close(got[beams], want, rtol=1e-6, atol=1e-6, msg=f"row {row} ({name}) step {step}")
    # the vision-only adapter must move row 0's first scores well past that tolerance, or its match proves nothing
    # about the tower (Kosmos-2 reads it through 4 latent tokens: about 7e-5 here; mixed against alone: about 1e-7)
    base = _generated(model, "__base__", singles[0], num_beams)
    assert (mixed.scores[0][0] - base.scores[0][0]).abs().max() > 1e-5


def test_generate_text_only_decode_steps_need_no_mapping():
    # a family without a tower mapping still serves text-only rows: the language model's rows are the samples
    model = _two_adapters("llava")
    batch = tiny_inputs(model, batch_size=2, seed=2, with_images=False)
    batch.pop("labels")
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["full", "__base__"]).logits
    torch.testing.assert_close(mixed[0], _alone(model, "full", {k: v[:1] for k, v in batch.items()}).logits[0])


def test_every_tiny_family_has_a_mapping():
    assert set(SUPPORTED_TINY_MODEL_TYPES) <= set(MIXED_BATCH_MODEL_TYPES)


def test_unknown_family_is_refused_by_name():
    model = _two_adapters("llava")
    batch = tiny_inputs(model, batch_size=2, seed=1)
    batch.pop("labels")
    model.config.model_type = "my_new_vlm"  # a family whose tower rows we cannot map
    with pytest.raises(MixedBatchError, match="'my_new_vlm'.*one adapter per batch"):
        model(**batch, adapter_names=["full", "vis"])


def test_llava_next_rows_with_images_of_different_sizes():
    # placeholders per image depend on its size (anyres crops, unpadding, newlines): rows hold 36 + 52, 0, 56 + 36
    model = _two_adapters("llava_next")
    batch, singles = multi_image_batch(model, [2, 0, 2])
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert len(set(per_row)) == len(per_row) and batch["image_sizes"].unique(dim=0).shape[0] == 3
    _assert_rows_match(model, batch, singles, ["vis", "full", "full"])


def test_llava_next_sizes_that_do_not_fit_the_placeholders_are_refused():
    model = _two_adapters("llava_next")
    batch, _ = multi_image_batch(model, [2, 1])
    batch["image_sizes"] = batch["image_sizes"].flip(0)  # the same images, each claiming another's size
    with pytest.raises(MixedBatchError, match="llava_next: row 0 has .* image placeholder"):
        model(**batch, adapter_names=["full", "vis"])


def test_placeholders_that_do_not_fit_the_images_are_refused():
    model = _two_adapters("qwen2_vl")
    batch, _ = multi_image_batch(model, [2, 1])
    batch["image_grid_thw"] = batch["image_grid_thw"][:2]  # three images' placeholders, two images
    with pytest.raises(MixedBatchError, match="qwen2_vl"):
        model(**batch, adapter_names=["full", "vis"])


def test_wrong_number_of_names_is_refused():
    model = _two_adapters("llava")
    batch = tiny_inputs(model, batch_size=2, seed=1)
    batch.pop("labels")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**batch, adapter_names=["full", "vis", "full"])
