"""A VisionLoraConfig adapter is PEFT LoRA on the modules the hand truth names: same keys, same outputs, gradients
only there. The reference is PEFT's own LoraConfig, told its modules, ranks and modules_to_save from `zoo_truth`
(never from our resolved config), so a selection or rank bug in the library cannot reach the reference too."""

import re

import pytest
import torch
from helpers import fresh_model, inputs_for, model_type_params, shared_model
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from zoo_truth import PROJECTOR_WITHOUT_LINEAR, ZOO_TRUTH, expected_targets

from peft_vision_lora import VisionLoraConfig

RANKS = {"vision": 2, "language": 6, "projector": 3}  # cross_attention and qformer keep r=4
# What each preset trains (see the VisionLoraConfig docs): cross-attention follows the language flag, and neither
# preset touches the projector (nor the Q-Former, which follows it).
TASK_COMPONENTS = {"vqa": ("language", "cross_attention"), "domain_adaptation": ("vision",)}


def _ours(model_type: str, **flags):
    # A projector without a linear (gemma3) cannot take LoRA: it is trained fully (modules_to_save) instead.
    projector = "full" if model_type in PROJECTOR_WITHOUT_LINEAR else True
    config = VisionLoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        finetune_projector=projector,
        component_r=RANKS,
        kernel="torch",
        **flags,
    )
    model = fresh_model(model_type)  # built (and seeded) before the adapter's seed below
    torch.manual_seed(0)
    return get_peft_model(model, config)


def _truth_targets(model_type: str) -> dict[str, str]:
    """{module: component} `_ours` must adapt: every component is on (language opens cross-attention, the projector
    flag opens the Q-Former); a fully trained projector gets no LoRA."""
    components = ["vision", "language", "cross_attention", "qformer"]
    if model_type not in PROJECTOR_WITHOUT_LINEAR:
        components.append("projector")
    return expected_targets(shared_model(model_type), model_type, components)


def _plain_lora_like(ours, model_type: str):
    """PEFT's own LoRA, told the truth's modules and ranks explicitly, with our weights copied in by key."""
    targets = _truth_targets(model_type)
    assert set(ours.base_model.targeted_module_names) == set(targets)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=sorted(targets),
        rank_pattern={re.escape(name): RANKS[c] for name, c in targets.items() if c in RANKS},
        modules_to_save=ZOO_TRUTH[model_type]["projector"] if model_type in PROJECTOR_WITHOUT_LINEAR else None,
    )
    model = fresh_model(model_type)
    torch.manual_seed(0)
    reference = get_peft_model(model, config)
    # Same seed, same modules, same order, same shapes: the initial adapter weights are identical, key for key.
    init_ours, init_ref = get_peft_model_state_dict(ours), get_peft_model_state_dict(reference)
    assert init_ours.keys() == init_ref.keys()
    assert [k for k in init_ours if not torch.equal(init_ours[k], init_ref[k])] == []
    result = set_peft_model_state_dict(reference, get_peft_model_state_dict(ours))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return reference


@pytest.mark.parametrize("model_type", model_type_params())
def test_forward_and_backward_equal_peft_lora(model_type):
    ours = _ours(model_type).train()
    reference = _plain_lora_like(ours, model_type).train()
    batch = inputs_for(model_type)
    # Train mode on purpose (dropout in the base model, LoRA path in training): same seed, same masks.
    torch.manual_seed(1)
    out_ours = ours(**batch)
    torch.manual_seed(1)
    out_ref = reference(**batch)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_ref.loss.backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_ref.keys()
    for name, grad in grads_ours.items():
        if grad is None:  # e.g. the last CLIP layer of LLaVA, whose output feeds nothing
            assert grads_ref[name] is None, name
            continue
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", model_type_params())
@pytest.mark.parametrize("task", ["vqa", "domain_adaptation"])
def test_only_selected_adapters_are_trainable_and_get_gradients(model_type, task):
    config = VisionLoraConfig(r=4, init_lora_weights=False, task=task)
    model = get_peft_model(fresh_model(model_type), config).train()
    truth = set(expected_targets(shared_model(model_type), model_type, TASK_COMPONENTS[task]))
    assert set(model.base_model.targeted_module_names) == truth
    model(**inputs_for(model_type)).loss.backward()
    with_grad = set()
    for name, param in model.named_parameters():
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        if param.requires_grad:
            assert ".lora_" in name and module in truth, name
            if param.grad is not None and param.grad.abs().sum() > 0:
                with_grad.add(module)
        else:
            assert param.grad is None, name
    assert with_grad == truth  # every adapter the truth names gets a gradient, and no other
