"""PEFT's ``layers_to_transform`` / ``layers_pattern`` are honoured on every target form, or refused up front."""

import pytest
import torch
from helpers import FAST_MODEL_TYPES, fresh_model, inputs_for, shared_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from zoo_truth import expected_linears

from peft_vision_lora import (
    VisionLoraConfig,
    VisionLoraConfigError,
    compile_targets,
    resolve_components,
    skipped_modules,
)
from peft_vision_lora.resolve.components import layer_slot

ATTENTION_LEAVES = ("q_proj", "v_proj", "qkv", "query", "value", "q", "v")


def _leaves(model) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return sorted(set(ATTENTION_LEAVES) & present)


def _adapted(model) -> set[str]:
    names = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return {n.removeprefix("base_model.model.") for n in names}


def _planned(model, **options) -> set[str]:
    return {t.name for t in compile_targets(model, VisionLoraConfig(r=4, **options)).targets}


@pytest.mark.parametrize("model_type", FAST_MODEL_TYPES)
@pytest.mark.parametrize("layers", [[0], 1])
def test_leaf_list_with_layers_matches_peft_lora(model_type, layers):
    """Same modules and same numbers as PEFT's LoRA given the same leaf names and layers (non-negative indices)."""
    leaves = _leaves(shared_model(model_type))
    options = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=leaves, layers_to_transform=layers)
    torch.manual_seed(0)
    ours = get_peft_model(fresh_model(model_type), VisionLoraConfig(kernel="torch", finetune_qformer=True, **options))
    torch.manual_seed(0)
    reference = get_peft_model(fresh_model(model_type), LoraConfig(**options))
    # PEFT's own filter also adapts vision layers past the feature layer; ours never does (no gradient reaches them)
    skipped = {name for name, _ in skipped_modules(ours)}
    assert _adapted(ours) == _adapted(reference) - skipped
    assert _adapted(ours), "the filter kept nothing: the test proves nothing"
    every = _planned(shared_model(model_type), target_modules=leaves, finetune_qformer=True)
    assert _adapted(ours) < every, "layers_to_transform removed no layer"
    if not skipped:
        batch = inputs_for(model_type)
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


def _slots(model, names):
    components = resolve_components(model)
    modules = dict(model.named_modules())
    return {n: layer_slot(components, modules, components.component_of(n), n) for n in names}


@pytest.mark.parametrize("model_type", FAST_MODEL_TYPES)
def test_all_linear_with_layers_keeps_only_those_layers(model_type):
    """PEFT refuses layers_to_transform with "all-linear"; VISION_LORA honours it in every component's stacks."""
    model = shared_model(model_type)
    kept = _planned(model, layers_to_transform=[0], finetune_projector=True)
    every = _planned(model, finetune_projector=True)
    components = resolve_components(model)
    projector = {n for n in every if components.component_of(n) == "projector"}
    assert projector <= kept, "the projector has no layers and is kept whole"
    slots = _slots(model, every - projector)
    assert kept - projector == {n for n, slot in slots.items() if slot is not None and slot[1] == 0}
    assert kept - projector and kept < every


def test_negative_index_counts_from_the_end_of_each_stack():
    model = shared_model("qwen2_vl")
    slots = _slots(model, _planned(model))
    last = {n for n, slot in slots.items() if slot is not None and slot[1] == slot[2] - 1}
    assert _planned(model, layers_to_transform=-1) == last


def test_component_layers_win_for_the_components_they_name():
    model = shared_model("qwen2_vl")
    components = resolve_components(model)
    both = _planned(model, layers_to_transform=[0], component_layers={"vision": [1]})
    slots = _slots(model, both)
    by_component = {}
    for name, slot in slots.items():
        by_component.setdefault(components.component_of(name), set()).add(slot[1])
    assert by_component == {"vision": {1}, "language": {0}}


def test_layers_pattern_names_the_stacks():
    model = shared_model("qwen2_vl")  # vision stack `blocks`, language stack `layers`
    components = resolve_components(model)
    only_language = _planned(model, layers_to_transform=[0], layers_pattern="layers")
    assert only_language and {components.component_of(n) for n in only_language} == {"language"}
    both = _planned(model, layers_to_transform=[0], layers_pattern=["layers", "blocks"])
    assert both == _planned(model, layers_to_transform=[0])


def test_layers_pattern_matching_no_stack_is_refused_before_the_model_is_touched():
    model = fresh_model("llava")
    with pytest.raises(VisionLoraConfigError, match="layers_pattern"):
        get_peft_model(model, VisionLoraConfig(layers_to_transform=[0], layers_pattern="blocks"))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_index_in_no_stack_is_refused_before_the_model_is_touched():
    model = fresh_model("llava")
    with pytest.raises(VisionLoraConfigError, match=r"layers \[7\].*component_layers"):
        get_peft_model(model, VisionLoraConfig(layers_to_transform=[0, 7]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers_pattern": "layers"}, "needs `layers_to_transform`"),
        ({"layers_to_transform": []}, "non-empty list of ints"),
        ({"layers_to_transform": ["0"]}, "non-empty list of ints"),
        ({"layers_to_transform": [0], "layers_pattern": ""}, "module-list name"),
    ],
)
def test_bad_layer_options_are_refused(options, message):
    with pytest.raises(VisionLoraConfigError, match=message):
        VisionLoraConfig(**options)


def test_layer_filter_survives_save_and_reload(tmp_path):
    torch.manual_seed(0)
    config = VisionLoraConfig(r=4, init_lora_weights=False, layers_to_transform=[0], task="vqa")
    model = get_peft_model(fresh_model("qwen2_vl"), config)
    batch = inputs_for("qwen2_vl")
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_model("qwen2_vl"), tmp_path)
    assert _adapted(loaded) == _adapted(model)
    assert loaded.peft_config["default"].layers_to_transform == [0]
    torch.testing.assert_close(loaded(**batch).logits, expected)


def _truth_targets(model, model_type) -> set[str]:
    components = ("vision", "language", "cross_attention")
    return set().union(*(expected_linears(model, model_type, c) for c in components))


@pytest.mark.parametrize("model_type, pattern", [("mllama", "layers"), ("qwen2_vl", "blocks"), ("llava", "layers")])
def test_layers_pattern_wraps_what_peft_wraps_for_the_same_modules(model_type, pattern):
    """PEFT's own filter, given the hand truth's linears by full name, is the oracle; Mllama's cross-attention block
    (``language_model.layers.1.cross_attn``) counts in the language stack."""
    truth = _truth_targets(shared_model(model_type), model_type)
    options = dict(r=4, layers_to_transform=[1], layers_pattern=pattern)
    ours = get_peft_model(fresh_model(model_type), VisionLoraConfig(**options))
    reference = get_peft_model(fresh_model(model_type), LoraConfig(target_modules=sorted(truth), **options))
    assert _adapted(reference), "PEFT's filter kept nothing: the test proves nothing"
    assert _adapted(ours) == _adapted(reference)
    if model_type == "mllama":
        assert any(".cross_attn." in name for name in _adapted(ours))


def test_negative_index_is_checked_against_each_stack_length():
    """Mllama has stacks of 2, 1 and 2 layers: -2 is the first layer of the two-layer stacks; 2 is in none."""
    model = shared_model("mllama")
    kept = _planned(model, layers_to_transform=[-2])
    stacks = {"model.vision_model.transformer.layers", "model.language_model.layers"}
    truth = _truth_targets(model, "mllama")
    assert kept == {n for n in truth if any(n.startswith(f"{s}.0.") for s in stacks)}
    lengths = "{'model.vision_model.transformer.layers': 2, 'model.vision_model.global_transformer.layers': 1, "
    with pytest.raises(VisionLoraConfigError) as error:
        _planned(model, layers_to_transform=[2])
    assert "layers [2]" in str(error.value) and lengths in str(error.value)
    assert str(error.value).endswith(
        "'model.language_model.layers': 2} (stack: number of layers). Use indices inside those ranges (negative ones "
        "count from the end), or `component_layers` for different layers per component."
    )


@pytest.mark.parametrize(
    "options, where",
    [
        ({"layers_pattern": "blocks"}, "sits in a module list named ['blocks']"),
        ({"component_layers": {"vision": [0], "language": [0]}}, "sits in a numbered stack of layers"),
    ],
)
def test_a_filter_that_reaches_no_stack_says_what_to_do(options, where):
    with pytest.raises(VisionLoraConfigError) as error:
        _planned(shared_model("llava"), layers_to_transform=[0], **options)
    message = str(error.value)
    assert message.endswith(
        f"{where}. Check `layers_pattern` (e.g. 'layers', 'blocks'), or pick layers per component with "
        "`component_layers={'vision': [...], 'language': [...]}`."
    )
