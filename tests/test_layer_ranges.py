"""Layer ranges per component (``component_layers``): only the listed layers of each component's stacks are adapted.

Expected sets are built from the module names (``.layers.3.``) with the hand-written truth of `zoo_truth.py`, not from
the resolver's layer bookkeeping.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from zoo_truth import expected_linears

from peft_vision_lora import VisionLoraConfig, VisionLoraConfigError, compile_targets
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

DEEP = {"vision_config": {"depth": 4, "num_hidden_layers": 4}, "text_config": {"num_hidden_layers": 4}}


def selected(model, **kwargs) -> set[str]:
    return {t.name for t in compile_targets(model, VisionLoraConfig(r=4, **kwargs)).targets}


def in_layers(names: set[str], stack: str, layers: set[int]) -> set[str]:
    """Names whose index right after ``stack`` (a dotted path such as ``model.visual.blocks``) is in ``layers``."""
    pattern = re.compile(re.escape(stack) + r"\.(\d+)\.")
    return {n for n in names if (m := pattern.match(n)) and int(m.group(1)) in layers}


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_vlm("qwen2_vl", **DEEP)


@pytest.fixture(scope="module")
def llava():
    return build_tiny_vlm("llava", **DEEP)


def test_last_vision_blocks_only(qwen):
    vision, language = expected_linears(qwen, "qwen2_vl", "vision"), expected_linears(qwen, "qwen2_vl", "language")
    assert len({n.split(".")[3] for n in vision}) == 4  # four vision blocks to choose from
    chosen = selected(qwen, component_layers={"vision": [-2, -1]})
    assert chosen == in_layers(vision, "model.visual.blocks", {2, 3}) | language
    # The merger sits in the vision module but is the projector: no layer list touches it.
    with_projector = selected(qwen, finetune_projector=True, component_layers={"vision": [-1]})
    assert expected_linears(qwen, "qwen2_vl", "projector") <= with_projector


def test_language_layer_list_and_range(llava):
    vision, language = expected_linears(llava, "llava", "vision"), expected_linears(llava, "llava", "language")
    chosen = selected(llava, component_layers={"language": [0, 2]})
    assert chosen == vision | in_layers(language, "model.language_model.layers", {0, 2})
    assert selected(llava, component_layers={"language": range(1, 4)}) == vision | in_layers(
        language, "model.language_model.layers", {1, 2, 3}
    )


def test_each_component_resolves_its_own_negative_indices(llava):
    """-2 is layer 2 of the 4-layer vision tower, -4 layer 0 of the 4-layer language model, each counted on its own
    (LLaVA's vision layer 3 lies after vision_feature_layer=-2 and is never adapted)."""
    vision, language = expected_linears(llava, "llava", "vision"), expected_linears(llava, "llava", "language")
    chosen = selected(llava, component_layers={"vision": [-2], "language": [-4]})
    assert chosen == in_layers(vision, "model.vision_tower.encoder.layers", {2}) | in_layers(
        language, "model.language_model.layers", {0}
    )


def test_several_stacks_and_cross_attention():
    """Mllama's vision has a local and a global encoder (each keeps its last layer); cross-attention blocks are
    counted in the language model's layers."""
    model = build_tiny_vlm("mllama", text_config={"num_hidden_layers": 4, "cross_attention_layers": [1, 3]})
    vision = expected_linears(model, "mllama", "vision")
    cross = {n for n in selected(model) if ".cross_attn." in n}
    assert {n.split(".")[3] for n in cross} == {"1", "3"}
    chosen = selected(model, task="domain_adaptation", component_layers={"vision": [-1]})
    assert chosen == in_layers(vision, "model.vision_model.transformer.layers", {1}) | in_layers(
        vision, "model.vision_model.global_transformer.layers", {0}
    )
    only_last_cross = selected(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=False,
        finetune_cross_attention=True,
        component_layers={"cross_attention": [3]},
    )
    assert only_last_cross == in_layers(cross, "model.language_model.layers", {3})


def test_out_of_range_and_malformed_requests_are_errors(llava):
    with pytest.raises(VisionLoraConfigError, match=r"asks for layers \[7\].*model.language_model.layers"):
        selected(llava, component_layers={"language": [0, 7]})
    with pytest.raises(VisionLoraConfigError, match="Unknown component"):
        VisionLoraConfig(component_layers={"text": [0]})
    with pytest.raises(VisionLoraConfigError, match="must hold integers"):
        VisionLoraConfig(component_layers={"vision": [0.5]})
    with pytest.raises(VisionLoraConfigError, match="non-empty list"):
        VisionLoraConfig(component_layers={"vision": []})
    # A layer list for a component whose flag is off narrows nothing and is no error.
    assert selected(llava, task="vqa", component_layers={"vision": [9]}) == expected_linears(
        llava, "llava", "language"
    )


def test_adapter_trains_only_chosen_layers_and_reloads(tmp_path):
    # vision_feature_layer=-2 leaves the last vision layer feeding nothing: use -1 so that it gets a gradient.
    base = build_tiny_vlm("llava", vision_feature_layer=-1, **DEEP)
    config = VisionLoraConfig(
        r=4, init_lora_weights=False, kernel="torch", component_layers={"vision": [-1], "language": range(2, 4)}
    )
    vision, language = expected_linears(base, "llava", "vision"), expected_linears(base, "llava", "language")
    model = get_peft_model(base, config)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    expected = in_layers(vision, "model.vision_tower.encoder.layers", {3}) | in_layers(
        language, "model.language_model.layers", {2, 3}
    )
    assert adapted == expected

    model(**tiny_inputs(base)).loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            grad = module.lora_A["default"].weight.grad
            assert grad is not None and grad.abs().sum() > 0, name

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["component_layers"] == {"vision": [-1], "language": [2, 3]}
    reloaded = PeftModel.from_pretrained(build_tiny_vlm("llava", vision_feature_layer=-1, **DEEP), tmp_path)
    again = {n.removeprefix("base_model.model.") for n, m in reloaded.named_modules() if isinstance(m, LoraLayer)}
    assert again == expected
    batch = tiny_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
