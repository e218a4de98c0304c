"""Every LoraConfig field works through VisionLoraConfig exactly as through LoraConfig, or is refused up front."""

import dataclasses
import pathlib

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import (
    EvaConfig,
    LoraConfig,
    LoraGAConfig,
    LoraRuntimeConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig

from peft_vision_lora import VisionLoraConfig, VisionLoraConfigError
from peft_vision_lora.tuner.lora_options import LORA_OPTIONS, option_table, status_here

DESIGN_NOTES = pathlib.Path(__file__).parents[1] / "docs" / "design-notes.md"
MODEL = "qwen2_vl"  # no unreachable layers: every module the flags choose is adapted on both sides

# A non-default value for each field passed through unchanged.
SAME_VALUES = {
    "task_type": "CAUSAL_LM",
    "auto_mapping": {"base_model_class": "Qwen2VLForConditionalGeneration", "parent_library": "transformers"},
    "peft_version": "0.0.1",
    "base_model_name_or_path": "tiny/qwen2-vl",
    "revision": "v1",
    "inference_mode": True,
    "r": 6,
    "lora_alpha": 3,
    "lora_dropout": 0.25,
    "fan_in_fan_out": True,
    "bias": "all",
    "use_rslora": True,
    "modules_to_save": ["lm_head"],
    "init_lora_weights": "gaussian",
    "rank_pattern": {"q_proj": 2},
    "alpha_pattern": {"v_proj": 2},
    "trainable_token_indices": [5, 6],
    "use_dora": True,
    "runtime_config": LoraRuntimeConfig(ephemeral_gpu_offload=True),
    "lora_bias": True,
    "ensure_weight_tying": True,
    # read only with their init (tested in test_initializations.py); alone, ignored with PEFT's warning, as in LoRA
    "eva_config": EvaConfig(rho=2.0),
    "corda_config": CordaConfig(corda_method="kpm"),
    "lora_ga_config": LoraGAConfig(direction="ArB2r"),
}
# "needs-cuda" fields: same where CUDA is present (tested on a GPU by test_initializations.py), refused elsewhere.
NEEDS_CUDA_VALUES = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
# A non-default value for each refused field.
REFUSED_VALUES = {
    "megatron_config": {"tensor_model_parallel_size": 1},
    "megatron_core": "my.megatron.core",
    "velora_config": {"rank": 4},
    "alora_invocation_tokens": [5],
    "use_qalora": True,
    "qalora_group_size": 8,
    "monteclora_config": {"n_components": 2},
    "layer_replication": [[0, 2]],
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "use_bdlora": {"block_size": 2},
    "arrow_config": {"top_k": 1},
    "kasa_config": {"rank": 2},
}


def test_every_lora_config_field_is_classified():
    """A field that a new PEFT release adds fails here until it is tested through and put in the table."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert sorted(fields ^ set(LORA_OPTIONS)) == []
    same = {name for name, (status, _) in LORA_OPTIONS.items() if status == "same"}
    refused = {name for name, (status, _) in LORA_OPTIONS.items() if status == "refused"}
    needs_cuda = {name for name, (status, _) in LORA_OPTIONS.items() if status == "needs-cuda"}
    assert set(SAME_VALUES) == same
    assert set(REFUSED_VALUES) == refused
    assert set(NEEDS_CUDA_VALUES) == needs_cuda


def test_design_notes_hold_the_generated_table():
    assert option_table() in DESIGN_NOTES.read_text(), "regenerate: python scripts/lora_option_table.py --write"


REFUSED_HERE = {**REFUSED_VALUES, **{k: v for k, v in NEEDS_CUDA_VALUES.items() if status_here(k) == "refused"}}


@pytest.mark.parametrize("field", sorted(REFUSED_HERE))
def test_refused_options_raise_when_the_config_is_built(field):
    with pytest.raises(VisionLoraConfigError, match=rf"\['{field}'\].*LoraConfig"):
        VisionLoraConfig(**{field: REFUSED_HERE[field]})


def _adapted(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("field", sorted(SAME_VALUES))
def test_same_options_give_the_same_layers_and_numbers(field):
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, field: SAME_VALUES[field]}
    torch.manual_seed(0)
    ours = get_peft_model(fresh_model(MODEL), VisionLoraConfig(kernel="torch", **options))
    resolved = ours.peft_config["default"]
    reference_options = {**options, "target_modules": sorted(ours.base_model.targeted_module_names)}
    reference_options["rank_pattern"] = resolved.rank_pattern  # user patterns plus (here: no) per-component ones
    torch.manual_seed(0)
    reference = get_peft_model(fresh_model(MODEL), LoraConfig(**reference_options))

    assert _adapted(ours) == _adapted(reference)
    for name in LORA_OPTIONS:
        if name not in ("peft_type", "target_modules", "task_type") and hasattr(
            reference.peft_config["default"], name
        ):
            assert getattr(resolved, name) == getattr(reference.peft_config["default"], name), name
    if field != "alpha_pattern":  # same seed, same modules, same order: same initial weights (init options included)
        initial, initial_ref = get_peft_model_state_dict(ours), get_peft_model_state_dict(reference)
        assert [k for k in initial if not torch.equal(initial[k], initial_ref[k])] == []
    # with alpha_pattern, PEFT's LoraConfig draws its initial weights from another RNG state; compare from equal ones
    set_peft_model_state_dict(reference, get_peft_model_state_dict(ours))
    params = {n: p for n, p in ours.named_parameters()}
    ref_params = {n: p for n, p in reference.named_parameters()}
    assert params.keys() == ref_params.keys()
    assert [n for n, p in params.items() if p.requires_grad] == [n for n, p in ref_params.items() if p.requires_grad]
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=0, atol=0, msg=name)

    batch = inputs_for(MODEL)
    ours.eval(), reference.eval()  # dropout masks are drawn differently by the fused path: compare without them
    out, ref = ours(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    if field == "inference_mode":
        return
    out.loss.backward()
    ref.loss.backward()
    for name, value in params.items():
        if value.requires_grad:
            torch.testing.assert_close(value.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
