"""Every adapter created learns: layers whose output cannot reach the loss are never adapted, and explain says so.

One optimizer-free step per tiny family on a batch *with images* (a text-only batch never runs the vision tower, so
vision adapters get no gradient there by construction; the docs say so).
"""

import pytest
import torch
from helpers import fresh_model, inputs_for, model_type_params
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_vision_lora import VisionLoraConfig, explain, skipped_modules

FEATURE_LAYER_FAMILIES = ("llava", "llava_next", "video_llava")


def _one_backward(model, model_type):
    batch = inputs_for(model_type)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.parametrize("model_type", model_type_params())
def test_every_adapter_gets_a_gradient(model_type):
    projector = "full" if model_type == "gemma3" else True
    config = VisionLoraConfig(r=4, init_lora_weights=False, finetune_projector=projector, finetune_qformer=True)
    torch.manual_seed(0)
    model = get_peft_model(fresh_model(model_type), config)
    grads = _one_backward(model, model_type)
    assert grads
    dead = sorted(n for n, g in grads.items() if g is None or not torch.count_nonzero(g))
    assert dead == []


@pytest.mark.parametrize("model_type", FEATURE_LAYER_FAMILIES)
def test_plain_lora_on_the_same_request_leaves_dead_adapters(model_type):
    """The control: PEFT's LoRA on every vision linear adapts the last layer, which never gets a gradient."""
    ours = get_peft_model(fresh_model(model_type), VisionLoraConfig(r=4, init_lora_weights=False))
    skipped = {name for name, _ in skipped_modules(ours)}
    assert skipped and all(".layers.1." in name for name in skipped)
    adapted = {n.removeprefix("base_model.model.") for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert not adapted & skipped
    control = get_peft_model(
        fresh_model(model_type), LoraConfig(r=4, init_lora_weights=False, target_modules=sorted(adapted | skipped))
    )
    grads = _one_backward(control, model_type)
    no_grad = {n.removeprefix("base_model.model.").split(".lora_")[0] for n, g in grads.items() if g is None}
    assert no_grad == skipped


def test_feature_layer_list_keeps_everything_up_to_the_deepest():
    model = fresh_model("llava")
    model.config.vision_feature_layer = [-3, -1]
    assert skipped_modules(model, VisionLoraConfig()) == []
    model.config.vision_feature_layer = [0, -3]  # hidden state 0 is the embeddings: both layers are unreachable
    skipped = skipped_modules(model, VisionLoraConfig())
    assert {name.split(".layers.")[1][0] for name, _ in skipped} == {"0", "1"}


def test_explain_lists_the_skipped_layers_with_the_reason(capsys):
    model = fresh_model("llava")
    explain(model, VisionLoraConfig())
    planned = capsys.readouterr().out
    peft_model = get_peft_model(model, VisionLoraConfig())
    rows = explain(peft_model)
    adapted = capsys.readouterr().out
    for out in (planned, adapted):
        assert "6 chosen module(s) not adapted" in out
        assert "vision_tower.encoder.layers.1.self_attn.q_proj  (vision_feature_layer=-2" in out
    assert not any(".encoder.layers.1." in row.module for row in rows)


def test_only_unreachable_layers_chosen_is_an_actionable_error():
    with pytest.raises(ValueError, match="vision_feature_layer=-2"):
        get_peft_model(
            fresh_model("llava"), VisionLoraConfig(task="domain_adaptation", component_layers={"vision": [-1]})
        )
