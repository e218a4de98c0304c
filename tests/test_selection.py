"""Component flags select exactly the linears an independent reading of each model says they should.

Ground truth is `zoo_truth.py`, written by hand from the transformers sources; nothing here reads the resolver's
own tables.
"""

import pytest
from helpers import model_type_params, shared_model
from zoo_truth import PROJECTOR_WITHOUT_LINEAR, ZOO_TRUTH, expected_kind, expected_linears

from peft_vision_lora import VisionLoraConfig, compile_targets, resolve_components


def selected(model, **flags) -> set[str]:
    return {t.name for t in compile_targets(model, VisionLoraConfig(r=4, **flags)).targets}


def truth(model, model_type) -> dict[str, set[str]]:
    return {
        c: expected_linears(model, model_type, c)
        for c in ("vision", "language", "projector", "cross_attention", "qformer")
    }


@pytest.mark.parametrize("model_type", model_type_params())
def test_components_found_where_the_model_keeps_them(model_type):
    components = resolve_components(shared_model(model_type))
    expected = ZOO_TRUTH[model_type]
    assert sorted(components["vision"]) == sorted(expected["vision"])
    assert sorted(components["language"]) == sorted(expected["language"])
    assert sorted(components["projector"]) == sorted(expected["projector"])
    assert sorted(components["qformer"]) == sorted(expected["qformer"])
    assert sorted(components["cross_attention"]) == sorted(expected["cross_attention"])


@pytest.mark.parametrize("model_type", model_type_params())
def test_vision_language_and_both(model_type):
    model = shared_model(model_type)
    t = truth(model, model_type)
    assert t["vision"] and t["language"]
    assert selected(model, task="domain_adaptation") == t["vision"]
    assert selected(model, task="vqa") == t["language"] | t["cross_attention"]
    assert selected(model) == t["vision"] | t["language"] | t["cross_attention"]


@pytest.mark.parametrize("model_type", model_type_params())
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_attention_mlp_split(model_type, kind):
    model = shared_model(model_type)
    t = truth(model, model_type)
    in_towers = t["vision"] | t["language"] | t["cross_attention"]
    expected = {name for name in in_towers if expected_kind(name) == kind}
    flags = {"finetune_attention_modules": kind == "attention", "finetune_mlp_modules": kind == "mlp"}
    assert expected, f"{model_type} has no {kind} linears?"
    assert selected(model, **flags) == expected


@pytest.mark.parametrize("model_type", model_type_params())
def test_projector_flag(model_type):
    model = shared_model(model_type)
    t = truth(model, model_type)
    towers = t["vision"] | t["language"] | t["cross_attention"]
    if model_type in PROJECTOR_WITHOUT_LINEAR:
        with pytest.raises(ValueError, match="finetune_projector='full'"):
            selected(model, finetune_projector=True)
        plan = compile_targets(model, VisionLoraConfig(r=4, finetune_projector="full"))
        assert plan.modules_to_save == tuple(ZOO_TRUTH[model_type]["projector"])
        return
    assert t["projector"]
    assert selected(model, finetune_projector=True) == towers | t["projector"] | t["qformer"]
    only = selected(model, finetune_vision_layers=False, finetune_language_layers=False, finetune_projector=True)
    assert only == t["projector"] | t["qformer"]
    full = compile_targets(model, VisionLoraConfig(r=4, finetune_projector="full"))
    # A fully trained projector gets no LoRA on top; a Q-Former follows the projector flag with LoRA.
    assert {x.name for x in full.targets} == towers | t["qformer"]
    assert full.modules_to_save == tuple(ZOO_TRUTH[model_type]["projector"])


def test_cross_attention_flag_mllama():
    model = shared_model("mllama")
    t = truth(model, "mllama")
    assert t["cross_attention"]
    assert selected(model, finetune_cross_attention=False) == t["vision"] | t["language"]
    assert (
        selected(model, task="domain_adaptation", finetune_cross_attention=True) == t["vision"] | t["cross_attention"]
    )
    only_cross = selected(
        model, finetune_vision_layers=False, finetune_language_layers=False, finetune_cross_attention=True
    )
    assert only_cross == t["cross_attention"]


def test_qformer_flag_blip2():
    model = shared_model("blip-2")
    t = truth(model, "blip-2")
    assert t["qformer"]
    assert selected(model, finetune_qformer=True) == t["vision"] | t["language"] | t["qformer"]
    assert not (selected(model) & t["qformer"])


def test_leaf_names_narrow_the_candidates():
    model = shared_model("llava")
    t = truth(model, "llava")
    chosen = selected(model, target_modules=["q_proj", "v_proj"])
    assert chosen == {n for n in t["vision"] | t["language"] if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}


def test_never_targets_heads_or_embeddings():
    for model_type in ("llava", "blip-2", "kosmos-2", "qwen2_vl"):
        model = shared_model(model_type)
        names = selected(model, finetune_projector=True)
        never = ZOO_TRUTH[model_type]["never"]
        assert not [n for n in names if any(n == p or n.startswith(p + ".") for p in never)]
        assert not [n for n in names if n.endswith("lm_head")]
