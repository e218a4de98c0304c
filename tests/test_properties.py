"""Property: for any flag combination, the selection is the union/intersection the flags describe."""

import pytest
from helpers import shared_model
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo_truth import expected_kind, expected_linears

from peft_vision_lora import VisionLoraConfig, VisionLoraConfigError, compile_targets

MODEL_TYPES = ("qwen2_vl", "llava", "mllama", "blip-2", "kosmos-2")
flag = st.booleans()


def _expected(model_type: str, flags: dict) -> set[str]:
    model = shared_model(model_type)
    parts = {c: expected_linears(model, model_type, c) for c in ("vision", "language", "cross_attention", "projector")}
    parts["qformer"] = expected_linears(model, model_type, "qformer")
    chosen: set[str] = set()
    tower_flags = {
        "vision": flags["finetune_vision_layers"],
        "language": flags["finetune_language_layers"],
        "cross_attention": flags["finetune_cross_attention"],
        "qformer": flags["finetune_qformer"],
    }
    kinds = {
        k
        for k, on in (("attention", flags["finetune_attention_modules"]), ("mlp", flags["finetune_mlp_modules"]))
        if on
    }
    for component, on in tower_flags.items():
        if on:
            chosen |= {n for n in parts[component] if expected_kind(n) in kinds}
    if flags["finetune_projector"]:
        chosen |= parts["projector"]
    return chosen


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@settings(max_examples=40, deadline=None)
@given(vision=flag, language=flag, attention=flag, mlp=flag, projector=flag, cross=flag, qformer=flag)
def test_selection_is_what_the_flags_say(model_type, vision, language, attention, mlp, projector, cross, qformer):
    flags = {
        "finetune_vision_layers": vision,
        "finetune_language_layers": language,
        "finetune_attention_modules": attention,
        "finetune_mlp_modules": mlp,
        "finetune_projector": projector,
        "finetune_cross_attention": cross,
        "finetune_qformer": qformer,
    }
    expected = _expected(model_type, flags)
    try:
        plan = compile_targets(shared_model(model_type), VisionLoraConfig(r=4, **flags))
    except VisionLoraConfigError as error:
        assert not expected, f"raised {error} but {len(expected)} modules were expected"
        assert "no linear layer matched" in str(error)
        return
    assert {t.name for t in plan.targets} == expected
