"""Several VISION_LORA adapters on one model: add, switch, disable, delete, combine, save and reload each."""

import pytest
import torch
from helpers import fresh_model, inputs_for
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_vision_lora import VisionLoraConfig

MODEL_TYPE = "llava"


def _vision_only() -> VisionLoraConfig:
    return VisionLoraConfig(r=2, lora_alpha=4, finetune_language_layers=False, init_lora_weights=False)


def _language_only() -> VisionLoraConfig:
    return VisionLoraConfig(r=4, lora_alpha=4, finetune_vision_layers=False, init_lora_weights=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(MODEL_TYPE)).logits


def _carriers(model, adapter: str) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


@pytest.fixture
def two_adapters():
    base = fresh_model(MODEL_TYPE)
    base_logits = _logits(base)
    model = get_peft_model(base, _vision_only(), adapter_name="vision")
    model.add_adapter("language", _language_only())
    return model.eval(), base_logits


def test_each_adapter_compiles_its_own_flags(two_adapters):
    model, _ = two_adapters
    vision, language = _carriers(model, "vision"), _carriers(model, "language")
    assert vision and language and not vision & language
    assert all("vision_tower" in n for n in vision)
    assert all("language_model" in n for n in language)
    assert model.peft_config["vision"].target_modules != model.peft_config["language"].target_modules
    assert {model.get_submodule(n).r["language"] for n in language} == {4}


def test_set_adapter_and_disable_adapter(two_adapters):
    model, base_logits = two_adapters
    assert model.active_adapter == "vision"
    vision = _logits(model)
    model.set_adapter("language")
    language = _logits(model)
    with model.disable_adapter():
        disabled = _logits(model)
    torch.testing.assert_close(disabled, base_logits)
    torch.testing.assert_close(_logits(model), language)  # the context restores the active adapter
    for adapted in (vision, language):
        assert (adapted - base_logits).abs().max() > 1e-3
    assert (vision - language).abs().max() > 1e-3


def test_each_adapter_saves_with_its_card_and_reloads_alone(two_adapters, tmp_path):
    model, _ = two_adapters
    expected = {}
    for name in ("vision", "language"):
        model.set_adapter(name)
        expected[name] = _logits(model)
    model.save_pretrained(tmp_path)
    for name, strategy in (("vision", "vision"), ("language", "language")):
        card = ModelCard.load(tmp_path / name / "README.md")
        assert f"vision-lora-strategy:{strategy}" in card.data.tags
        single = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), tmp_path / name).eval()
        torch.testing.assert_close(_logits(single), expected[name], rtol=1e-5, atol=1e-6)


def test_delete_adapter_removes_its_layers_only(two_adapters):
    model, _ = two_adapters
    model.set_adapter("language")
    before = _logits(model)
    model.delete_adapter("vision")
    assert list(model.peft_config) == ["language"]
    assert not _carriers(model, "vision")
    torch.testing.assert_close(_logits(model), before)


def test_weighted_cat_combination_equals_both_adapters_active(two_adapters):
    model, _ = two_adapters
    model.base_model.set_adapter(["vision", "language"])
    both = _logits(model)
    model.add_weighted_adapter(["vision", "language"], [1.0, 1.0], "combined", combination_type="cat")
    model.set_adapter("combined")
    assert _carriers(model, "combined") == _carriers(model, "vision") | _carriers(model, "language")
    torch.testing.assert_close(_logits(model), both, rtol=1e-4, atol=1e-5)
    # Scaled weights scale the delta: half of each adapter is not the full combination.
    model.add_weighted_adapter(["vision", "language"], [0.5, 0.5], "halves", combination_type="cat")
    model.set_adapter("halves")
    assert (_logits(model) - both).abs().max() > 1e-3


def test_linear_copy_of_an_adapter_keeps_its_scaling(two_adapters):
    # The new adapter gets lora_alpha == r (scaling 1); the vision adapter's scaling 2 must be folded into it.
    model, _ = two_adapters
    vision = _logits(model)
    model.add_weighted_adapter(["vision"], [1.0], "vision_copy", combination_type="linear")
    model.set_adapter("vision_copy")
    assert {model.get_submodule(n).scaling["vision_copy"] for n in _carriers(model, "vision_copy")} == {1.0}
    torch.testing.assert_close(_logits(model), vision, rtol=1e-4, atol=1e-5)
