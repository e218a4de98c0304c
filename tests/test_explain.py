"""explain() and the strategy report tell the truth about what is (or would be) trained."""

import math

import pytest
from helpers import fresh_model, shared_model
from peft import get_peft_model
from torch import nn
from zoo_truth import expected_targets

from peft_vision_lora import VisionLoraConfig, explain, strategy_report

# What the default flags select: vision and language (cross-attention follows language); no projector or Q-Former.
DEFAULT_COMPONENTS = ("vision", "language", "cross_attention")


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora_params(model, name: str, r: int) -> int:
    """r * (in + out) from the base linear's weight shape (out, in)."""
    return r * sum(model.get_submodule(name).weight.shape)


def _truth_rows(model_type: str, components, rank: dict[str, int], r: int = 4) -> set[tuple]:
    """(module, component, rank, params) for each linear the hand truth puts in `components`."""
    base = shared_model(model_type)
    targets = expected_targets(base, model_type, components)
    return {(n, c, rank.get(c, r), _lora_params(base, n, rank.get(c, r))) for n, c in targets.items()}


def _rows(rows) -> set[tuple]:
    return {(r.module, r.component, r.rank, r.params) for r in rows}


def test_explain_adapted_model_rows(capsys):
    config = VisionLoraConfig(r=4, finetune_projector=True, component_r={"vision": 2, "projector": 3})
    model = get_peft_model(fresh_model("qwen2_vl"), config)
    rows = explain(model)
    printed = capsys.readouterr().out
    assert "module" in printed and "component" in printed and f"{len(rows)} modules" in printed
    assert _rows(rows) == _truth_rows("qwen2_vl", ("vision", "projector", "language"), {"vision": 2, "projector": 3})
    assert {r.module for r in rows} == set(model.base_model.targeted_module_names)
    assert sum(r.params for r in rows) == _trainable(model)
    assert {r.kind for r in rows if r.component != "projector"} == {"attention", "mlp"}


def test_explain_dry_run_matches_injection_and_touches_nothing():
    model = fresh_model("mllama")
    config = VisionLoraConfig(r=4, component_r={"cross_attention": 8})
    planned = explain(model, config, show=False)
    assert not config.is_resolved  # the user's config is not consumed by a dry run
    assert not any("lora_" in n for n, _ in model.named_parameters())
    adapted = explain(get_peft_model(model, config), show=False)
    strip = [(r.module, r.component, r.kind, r.rank, r.params) for r in planned]
    assert strip == [(r.module, r.component, r.kind, r.rank, r.params) for r in adapted]
    assert _rows(planned) == _truth_rows("mllama", DEFAULT_COMPONENTS, {"cross_attention": 8})
    assert {r.component for r in adapted} == {"vision", "language", "cross_attention"}


def test_explain_needs_an_adapter_or_a_config():
    with pytest.raises(ValueError, match="pass config=VisionLoraConfig"):
        explain(fresh_model("llava"), show=False)


def test_exclude_modules_is_honoured_and_reported():
    config = VisionLoraConfig(r=4, exclude_modules=["q_proj"])
    rows = explain(shared_model("llava"), config, show=False)
    assert rows and not [r for r in rows if r.module.endswith("q_proj")]
    truth = expected_targets(shared_model("llava"), "llava", DEFAULT_COMPONENTS)
    assert {r.module for r in rows} == {name for name in truth if not name.endswith(".q_proj")}
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4, exclude_modules=["q_proj"]))
    assert {r.module for r in rows} == set(model.base_model.targeted_module_names)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "mllama", "blip-2"])
def test_strategy_report_equals_real_trainable_parameters(model_type):
    base = shared_model(model_type)
    rows = {row.strategy: row for row in strategy_report(base, r=8)}
    presets = {"vision+language": "captioning", "language": "vqa", "vision": "domain_adaptation"}
    components = {
        "vision+language": DEFAULT_COMPONENTS,
        "language": ("language", "cross_attention"),
        "vision": ("vision",),
    }
    for strategy, task in presets.items():
        truth = expected_targets(base, model_type, components[strategy])
        assert rows[strategy].modules == len(truth), strategy
        assert rows[strategy].params == sum(_lora_params(base, name, 8) for name in truth), strategy
        model = get_peft_model(fresh_model(model_type), VisionLoraConfig(r=8, lora_alpha=8, task=task))
        assert rows[strategy].params == _trainable(model), strategy
    full = rows["vision+language"].params
    assert rows["language"].fraction_of_full == pytest.approx(rows["language"].params / full)
    assert rows["vision"].fraction_of_full == pytest.approx(rows["vision"].params / full)


def test_strategy_report_on_a_model_without_vision_tower():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    rows = {row.strategy: row for row in strategy_report(model, r=4)}
    assert rows["vision"].params == 0 and rows["vision+language"].params == 0
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert rows["language"].params == sum(4 * sum(m.weight.shape) for m in linears) > 0
    assert math.isnan(rows["language"].fraction_of_full)  # no full-VLM figure to compare against
