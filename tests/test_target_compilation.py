"""Target compilation beyond the component flags: what each Target records, the forms of ``target_modules`` and
``exclude_modules``, models already carrying an adapter, GPT-2-style ``Conv1D`` linears, linears that must never be
targets, the error messages, and how a plan is written back into the config.

Expected sets come from the hand-written truth of `zoo_truth.py` or from the module tree itself, never from the
resolver's own tables.
"""

from __future__ import annotations

import re

import pytest
from helpers import fresh_model, shared_model
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D
from zoo_truth import ZOO_TRUTH, expected_kind, expected_linears

from peft_vision_lora import ComponentResolutionError, VisionLoraConfig, VisionLoraConfigError, compile_targets
from peft_vision_lora.resolve.targets import apply_plan

LANGUAGE_LAYERS = "model.language_model.layers"
# llava feeds its projector hidden state -2 of its 2-layer CLIP tower: the last layer reaches nothing.
UNREACHABLE = "vision_feature_layer=-2: the projector reads hidden state 1 of 0-2, so the output never depends on"


def names(model, **flags) -> set[str]:
    return {t.name for t in compile_targets(model, VisionLoraConfig(r=4, **flags)).targets}


def truth(model, model_type: str, *components: str) -> set[str]:
    return set().union(*(expected_linears(model, model_type, c) for c in components))


def leaf(name: str) -> str:
    return name.split(".")[-1]


def lora_names(model, adapter: str = "default") -> set[str]:
    """Module names (as in the base model) that carry a LoRA layer for ``adapter``."""
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def text_only_model() -> nn.Module:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


# --- what each target records -----------------------------------------------------------------------------------


def test_each_target_records_its_component_kind_rank_alpha_and_shape():
    model = shared_model("llava")
    config = VisionLoraConfig(
        r=4,
        lora_alpha=8,
        finetune_projector=True,
        component_r={"vision": 2, "projector": 8},
        component_alpha={"language": 16},
    )
    plan = compile_targets(model, config)
    modules = dict(model.named_modules())
    expected = {"vision": (2, 8), "language": (4, 16), "projector": (8, 8)}
    components = {c: expected_linears(model, "llava", c) for c in expected}
    assert {t.name for t in plan.targets} == set().union(*components.values())
    for target in plan.targets:
        component = next(c for c, members in components.items() if target.name in members)
        weight = modules[target.name].weight  # nn.Linear stores (out, in)
        kind = "projector" if component == "projector" else expected_kind(target.name)
        assert (target.component, target.kind, target.r, target.alpha) == (component, kind, *expected[component])
        assert (target.in_features, target.out_features) == (weight.shape[1], weight.shape[0])
        assert target.lora_params == target.r * (weight.shape[0] + weight.shape[1])
    assert any(t.in_features != t.out_features for t in plan.targets)  # the shapes tell in from out
    assert plan.components.model_type == "llava"
    for component in expected:
        assert plan.components[component] == tuple(ZOO_TRUTH["llava"][component])


def test_by_component_groups_the_targets_in_order():
    plan = compile_targets(shared_model("llava"), VisionLoraConfig(r=4, finetune_projector=True))
    grouped = plan.by_component()
    assert list(grouped) == list(dict.fromkeys(t.component for t in plan.targets))  # first-seen order
    assert set(grouped) == {"vision", "language", "projector"}
    for component, targets in grouped.items():
        assert targets == [t for t in plan.targets if t.component == component]
    assert sum(len(t) for t in grouped.values()) == len(plan.targets)


def test_unreachable_layers_are_reported_as_skipped_not_targeted():
    model = shared_model("llava")
    plan = compile_targets(model, VisionLoraConfig(r=4))
    last_layer = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.vision_tower.encoder.layers.1.")
    }
    assert last_layer and {name for name, _ in plan.skipped} == last_layer
    assert all(reason.startswith(UNREACHABLE) for _, reason in plan.skipped)
    assert not last_layer & {t.name for t in plan.targets}


def test_conv1d_linears_read_in_and_out_from_their_transposed_weight():
    # GPT-2-style Conv1D stores its weight as (in, out), the transpose of nn.Linear's.
    model = fresh_model("llava")
    swapped = set()
    for index, layer in enumerate(model.model.language_model.layers):
        linear = layer.mlp.up_proj
        conv = Conv1D(linear.out_features, linear.in_features)
        conv.weight.data = linear.weight.data.T.contiguous()
        layer.mlp.up_proj = conv
        swapped.add(f"{LANGUAGE_LAYERS}.{index}.mlp.up_proj")
    plan = compile_targets(model, VisionLoraConfig(r=4, task="vqa"))
    shapes = {t.name: (t.in_features, t.out_features) for t in plan.targets}
    assert swapped <= set(shapes)
    assert {shapes[n] for n in swapped} == {(32, 64)}  # up_proj: hidden 32 -> intermediate 64
    # PEFT's LoRA layers over them have exactly the parameters the plan counts
    peft_model = get_peft_model(model, VisionLoraConfig(r=4, task="vqa"))
    modules = dict(peft_model.base_model.model.named_modules())
    for target in plan.targets:
        layer = modules[target.name]
        params = layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
        assert params == target.lora_params, target.name


# --- target_modules and exclude_modules ---------------------------------------------------------------------------


def test_target_modules_none_means_all_linear():
    model = shared_model("llava")
    assert names(model, target_modules=None) == names(model) == truth(model, "llava", "vision", "language")


def test_target_modules_regex_string_is_matched_against_full_names():
    model = shared_model("llava")
    everything = truth(model, "llava", "vision", "language")
    chosen = names(model, target_modules=r".*\.(q_proj|fc1)")
    assert chosen == {n for n in everything if leaf(n) in ("q_proj", "fc1")}


def test_target_modules_list_takes_full_names_and_leaf_names():
    model = shared_model("llava")
    one = f"{LANGUAGE_LAYERS}.0.self_attn.q_proj"
    chosen = names(model, target_modules=[one, "k_proj"])
    everything = truth(model, "llava", "vision", "language")
    assert chosen == {one} | {n for n in everything if leaf(n) == "k_proj"}


def test_target_modules_leaf_of_a_top_level_linear():
    # blip-2's projector is a top-level nn.Linear: its name is its own leaf.
    model = shared_model("blip-2")
    only_projector = {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_qformer": False}
    assert names(model, target_modules=["language_projection"], finetune_projector=True, **only_projector) == {
        "language_projection"
    }


def test_unknown_target_name_lists_the_leaf_names_present():
    model = shared_model("llava")
    leaves = sorted({leaf(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"})
    message = (
        f"target_modules ['qkv_projection'] match no linear layer in this model. Linear leaf names present: {leaves}."
    )
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(model, VisionLoraConfig(r=4, target_modules=["q_proj", "qkv_projection"]))
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("exclude", "dropped"),
    [
        (["q_proj"], lambda n: leaf(n) == "q_proj"),
        ([f"{LANGUAGE_LAYERS}.1.mlp.down_proj"], lambda n: n == f"{LANGUAGE_LAYERS}.1.mlp.down_proj"),
        (r".*vision_tower.*\.fc2", lambda n: "vision_tower" in n and leaf(n) == "fc2"),
    ],
    ids=["leaf", "full-name", "regex"],
)
def test_exclude_modules_drops_exactly_what_it_names(exclude, dropped):
    model = shared_model("llava")
    everything = truth(model, "llava", "vision", "language")
    expected = {n for n in everything if not dropped(n)}
    assert expected != everything
    assert names(model, exclude_modules=exclude) == expected


def test_resolved_config_compiles_its_request_not_its_stale_regex():
    # A saved config whose regex names another module layout is recompiled from the user's request.
    model = shared_model("llava")
    config = VisionLoraConfig(r=4, target_modules=["q_proj"])
    plan = compile_targets(model, config)
    apply_plan(config, plan)
    config.target_modules = r"^(?:renamed\.layers\.\d+\.q_proj)$"
    assert compile_targets(model, config).targets == plan.targets


# --- models that already carry an adapter -------------------------------------------------------------------------


def test_second_adapter_lands_on_the_same_linears_as_on_a_fresh_model():
    adapted = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4, finetune_projector="full"))
    config = VisionLoraConfig(r=2, component_r={"language": 6})
    fresh = compile_targets(shared_model("llava"), config)
    second = compile_targets(adapted, config)
    assert second.targets == fresh.targets
    assert second.target_regex == fresh.target_regex
    adapted.add_adapter("second", config)
    assert lora_names(adapted, "second") == {t.name for t in fresh.targets} == lora_names(adapted, "default")


def test_a_head_wrapped_by_another_adapter_is_still_never_a_target():
    # The output head keeps being a head under someone else's LoRA layer (blip-2's sits in the language model).
    model = get_peft_model(fresh_model("blip-2"), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "language_model.lm_head" in lora_names(model)
    assert names(model, task="vqa") == truth(shared_model("blip-2"), "blip-2", "language")


# --- linears that are never targets, whatever their place -------------------------------------------------------


def test_routers_inert_linears_and_embedding_linears_are_never_targets():
    model = fresh_model("llava")
    layer = model.model.language_model.layers[0]
    hidden = layer.mlp.up_proj.in_features
    layer.mlp.experts = nn.ModuleList([nn.Linear(hidden, hidden)])  # an MoE block: its gate routes
    layer.mlp.gate = nn.Linear(hidden, 1)
    layer.mlp.router = nn.Linear(hidden, 1)
    layer.self_attn.mha = nn.MultiheadAttention(hidden, 1)  # reads out_proj as a bare weight
    model.model.vision_tower.embeddings.patch_proj = nn.Linear(hidden, hidden)
    chosen = names(model)
    assert chosen == truth(shared_model("llava"), "llava", "vision", "language") | {
        f"{LANGUAGE_LAYERS}.0.mlp.experts.0"
    }


def test_selection_does_not_depend_on_where_heads_and_stray_linears_are_registered():
    # lm_head and a linear outside every component come first in named_modules() here.
    model = fresh_model("llava")
    backbone = model.model
    del model.model
    model.action_in = nn.Linear(8, 8)
    model.model = backbone
    assert next(n for n, _ in model.named_modules() if n) == "lm_head"
    assert names(model) == truth(shared_model("llava"), "llava", "vision", "language")


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_tower_and_missing_projector_errors():
    model = text_only_model()
    with pytest.raises(ComponentResolutionError) as info:
        compile_targets(model, VisionLoraConfig(r=4))
    assert re.fullmatch(
        r"finetune_vision_layers=True but no vision tower was found on model_type 'llama' \(found: .*\)\. Set "
        r"finetune_vision_layers=False, or report the model so it can join the override table\.",
        str(info.value),
    )
    with pytest.raises(ComponentResolutionError) as info:
        compile_targets(model, VisionLoraConfig(r=4, task="vqa", finetune_projector=True))
    assert re.fullmatch(
        r"finetune_projector=True but no projector was found on model_type 'llama' \(found: .*\)\. Set "
        r"finetune_projector=False\.",
        str(info.value),
    )


def test_projector_without_linear_error_names_the_projector():
    model = shared_model("gemma3")  # its projector is a bare weight matrix
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(model, VisionLoraConfig(r=4, finetune_projector=True))
    assert str(info.value) == (
        f"finetune_projector=True asks for LoRA on the projector, but the projector of 'gemma3' "
        f"({ZOO_TRUTH['gemma3']['projector']}) has no linear layer. Use finetune_projector='full' to train it fully."
    )


DESCRIBE = (
    r"\(llava: vision=\['model\.vision_tower'\], language=\['model\.language_model'\], "
    r"projector=\['model\.multi_modal_projector'\]\)\."
)


def test_nothing_matched_error_states_the_request():
    # fc1 exists only in the CLIP tower, which is off.
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(
            shared_model("llava"), VisionLoraConfig(r=4, finetune_vision_layers=False, target_modules=["fc1"])
        )
    assert re.fullmatch(
        r"no linear layer matched: vision=False, language=True, projector=False, attention=True, mlp=True, "
        r"target_modules=\{'fc1'\} on model_type 'llava' " + DESCRIBE,
        str(info.value),
    )


def test_nothing_matched_error_says_why_chosen_modules_were_skipped():
    # The only chosen module sits in the layer whose output never reaches the model's output.
    config = VisionLoraConfig(
        r=4, task="domain_adaptation", component_layers={"vision": [-1]}, target_modules=["q_proj"]
    )
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(shared_model("llava"), config)
    assert re.fullmatch(
        r"no linear layer matched: vision=True, language=False, projector=False, attention=True, mlp=True, "
        r"target_modules=\{'q_proj'\} on model_type 'llava' "
        + DESCRIBE
        + " 1 chosen module\\(s\\) were skipped: "
        + re.escape(UNREACHABLE + " layer 1 of this tower."),
        str(info.value),
    )


def test_nothing_matched_error_shows_a_missing_request_as_all_linear():
    # All six linears of the last CLIP layer are chosen, and none reaches the output.
    config = VisionLoraConfig(r=4, task="domain_adaptation", component_layers={"vision": [-1]}, target_modules=None)
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(shared_model("llava"), config)
    message = str(info.value)
    assert "target_modules='all-linear' on model_type 'llava'" in message
    assert message.endswith(f" 6 chosen module(s) were skipped: {UNREACHABLE} layer 1 of this tower.")


def test_layer_lists_narrow_every_named_component_even_after_one_whose_flag_is_off():
    model = shared_model("llava")
    chosen = names(model, finetune_vision_layers=False, component_layers={"vision": [0], "language": [0]})
    language = truth(model, "llava", "language")
    assert chosen == {n for n in language if n.startswith(f"{LANGUAGE_LAYERS}.0.")}


@pytest.mark.parametrize(
    ("component_layers", "flags", "stacks"),
    [
        ({"language": [2]}, {}, "{'model.language_model.layers': 2}"),  # one past the end
        ({"language": [-3]}, {}, "{'model.language_model.layers': 2}"),
        ({"projector": [0]}, {"finetune_projector": True}, "none (no numbered layers)"),
    ],
    ids=["past-the-end", "before-the-start", "no-stacks"],
)
def test_layer_out_of_range_error(component_layers, flags, stacks):
    ((component, layers),) = component_layers.items()
    with pytest.raises(VisionLoraConfigError) as info:
        compile_targets(shared_model("llava"), VisionLoraConfig(r=4, component_layers=component_layers, **flags))
    assert str(info.value) == (
        f"component_layers[{component!r}] asks for layers {layers}, but the selected {component} modules of 'llava' "
        f"sit in stacks {stacks} (stack: number of layers). Use indices inside those ranges (negative ones count "
        "from the end)."
    )


# --- writing the plan back -----------------------------------------------------------------------------------------


def test_apply_plan_records_the_request_and_merges_patterns_and_modules_to_save():
    model = shared_model("llava")
    config = VisionLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["v_proj", "q_proj"],
        component_r={"vision": 2},
        component_alpha={"vision": 6},
        finetune_projector="full",
        modules_to_save=["lm_head"],
    )
    plan = compile_targets(model, config)
    assert len(plan.rank_pattern) == len(plan.alpha_pattern) == 1  # only vision differs from r / lora_alpha
    config.rank_pattern, config.alpha_pattern = {"^kept$": 3}, {"^kept$": 5}  # patterns already there survive
    apply_plan(config, plan)
    assert config.is_resolved and config.requested_target_modules == ["q_proj", "v_proj"]
    assert config.target_modules == plan.target_regex
    assert config.rank_pattern == {"^kept$": 3, **plan.rank_pattern}
    assert config.alpha_pattern == {"^kept$": 5, **plan.alpha_pattern}
    assert config.modules_to_save == ["lm_head", "model.multi_modal_projector"]
    apply_plan(config, plan)  # again, on the resolved config: nothing doubles, the request stays
    assert config.requested_target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["lm_head", "model.multi_modal_projector"]
    assert config.rank_pattern == {"^kept$": 3, **plan.rank_pattern}


def test_apply_plan_keeps_a_string_request_as_is():
    model = shared_model("llava")
    config = VisionLoraConfig(r=4)
    plan = compile_targets(model, config)
    apply_plan(config, plan)
    assert config.requested_target_modules == "all-linear"
    assert config.target_modules == plan.target_regex
    assert config.modules_to_save is None
    assert {n for n, _ in model.named_modules() if re.fullmatch(config.target_modules, n)} == {
        t.name for t in plan.targets
    }
