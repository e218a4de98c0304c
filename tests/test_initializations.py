"""PiSSA, OLoRA, EVA, CorDA and LoRA-GA through VisionLoraConfig: the same adapter as PEFT's LoRA on the same modules,
a real training step, and PEFT's save-time conversion that loads on the original base and reproduces the model.
"""

import importlib.util
import json

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import (
    EvaConfig,
    LoraConfig,
    LoraGAConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    initialize_lora_eva_weights,
)
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.loraga import preprocess_loraga

from peft_vision_lora import (
    VisionLoraConfig,
    VisionLoraConfigError,
    eva_layer_inputs,
    eva_model_inputs,
    initialize_eva_weights,
    resolve_targets,
)
from peft_vision_lora.tuner.lora_options import cuda_available
from peft_vision_lora.zoo.tiny import tiny_inputs

FAMILIES = ("llava", "qwen2_vl")  # a projector module and a last vision layer left out; a merger, packed patches
OPTIONS = {"r": 4, "lora_alpha": 8}


def _reference_config(ours: PeftModel, **options) -> LoraConfig:
    """PEFT's LoRA on exactly the modules (and per-module ranks) VISION_LORA adapted."""
    resolved = ours.peft_config["default"]
    targets = sorted(ours.base_model.targeted_module_names)
    return LoraConfig(**OPTIONS, target_modules=targets, rank_pattern=dict(resolved.rank_pattern), **options)


def _assert_same_state(ours: torch.nn.Module, reference: torch.nn.Module, atol: float = 0.0) -> None:
    """Every parameter (adapter weights and the residual base weights the init wrote) equal on both sides."""
    params, ref_params = dict(ours.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=0, atol=atol, msg=name)


def _train_step(model: PeftModel, batch: dict) -> torch.Tensor:
    """One SGD step; returns the trained model's eval logits."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _saved_config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _convert_and_reload(model: PeftModel, model_type: str, init_dir, out_dir, batch: dict) -> torch.Tensor:
    model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(init_dir))
    assert _saved_config(init_dir)["init_lora_weights"] is True  # reloading it must not decompose the base again
    reloaded = PeftModel.from_pretrained(fresh_model(model_type), str(out_dir))
    return _logits(reloaded, batch)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_mutating_init_matches_lora_and_converts(model_type, init, tmp_path):
    batch = inputs_for(model_type)
    base, base_ref = fresh_model(model_type), fresh_model(model_type)  # built first: a first build seeds the RNG
    base_logits = _logits(fresh_model(model_type), batch)
    torch.manual_seed(0)
    config = VisionLoraConfig(**OPTIONS, component_r={"vision": 2}, kernel="torch", init_lora_weights=init)
    ours = get_peft_model(base, config)
    torch.manual_seed(0)
    reference = get_peft_model(base_ref, _reference_config(ours, init_lora_weights=init))

    _assert_same_state(ours, reference)  # same decomposition, same residual base
    # the init moves the top of W into B A: the adapted model still computes the base model's function
    torch.testing.assert_close(_logits(ours, batch), base_logits, rtol=0, atol=1e-4)

    ours.save_pretrained(str(tmp_path / "ours" / "init"))
    reference.save_pretrained(str(tmp_path / "ref" / "init"))
    trained = _train_step(ours, batch)
    trained_ref = _train_step(reference, batch)
    torch.testing.assert_close(trained, trained_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, base_logits, atol=1e-3)  # the step changed the model

    converted = _convert_and_reload(ours, model_type, tmp_path / "ours" / "init", tmp_path / "ours" / "out", batch)
    _convert_and_reload(reference, model_type, tmp_path / "ref" / "init", tmp_path / "ref" / "out", batch)
    torch.testing.assert_close(converted, trained, rtol=1e-5, atol=1e-5)  # original base + converted = trained

    saved, saved_ref = _saved_config(tmp_path / "ours" / "out"), _saved_config(tmp_path / "ref" / "out")
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert saved[key] == saved_ref[key], key
    assert (saved["r"], saved["lora_alpha"], saved["component_r"]) == (8, 16, {"vision": 4})
    weights = PeftModel.from_pretrained(fresh_model(model_type), str(tmp_path / "ours" / "out"))
    weights_ref = PeftModel.from_pretrained(fresh_model(model_type), str(tmp_path / "ref" / "out"))
    state, state_ref = get_peft_model_state_dict(weights), get_peft_model_state_dict(weights_ref)
    assert state.keys() == state_ref.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, state_ref[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_eva_matches_lora_on_every_component(model_type, tmp_path):
    batch = inputs_for(model_type)
    eva = EvaConfig(rho=2.0)
    ours = get_peft_model(
        fresh_model(model_type), VisionLoraConfig(**OPTIONS, kernel="torch", init_lora_weights="eva", eva_config=eva)
    )
    reference = get_peft_model(
        fresh_model(model_type), _reference_config(ours, init_lora_weights="eva", eva_config=eva)
    )
    torch.manual_seed(0)
    initialize_eva_weights(ours, [batch], show_progress_bar=False)
    torch.manual_seed(0)
    initialize_lora_eva_weights(
        reference,
        [inputs_for(model_type)],
        prepare_model_inputs_fn=eva_model_inputs,
        prepare_layer_inputs_fn=eva_layer_inputs,
        show_progress_bar=False,
    )
    resolved, resolved_ref = ours.peft_config["default"], reference.peft_config["default"]
    assert resolved.rank_pattern == resolved_ref.rank_pattern  # EVA's data-driven rank redistribution
    assert any(name.startswith(("model.vision_tower", "model.visual")) for name in resolved.rank_pattern)
    _assert_same_state(ours, reference, atol=1e-6)

    trained = _train_step(ours, batch)
    torch.testing.assert_close(trained, _train_step(reference, batch), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(str(tmp_path / "eva"))
    reloaded = PeftModel.from_pretrained(fresh_model(model_type), str(tmp_path / "eva"))
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=1e-5, atol=1e-5)


def test_eva_layer_inputs_keep_tokens_and_every_patch():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tokens = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    torch.testing.assert_close(eva_layer_inputs((tokens,), mask, "lm"), tokens[mask])
    patches = torch.arange(2 * 5 * 4.0).reshape(2, 5, 4)  # a vision layer: not the tokens' layout
    torch.testing.assert_close(eva_layer_inputs(patches, mask, "vision"), patches.reshape(10, 4))


def _preprocessed_pair(model_type, init, extra, preprocess):
    """Our adapter and PEFT's LoRA on the same modules, each built after PEFT's preprocessing of its own base."""
    base, base_ref = fresh_model(model_type), fresh_model(model_type)  # built first: a first build seeds the RNG
    torch.manual_seed(0)
    config = resolve_targets(base, VisionLoraConfig(**OPTIONS, kernel="torch", init_lora_weights=init, **extra))
    preprocess(base, config)
    ours = get_peft_model(base, config)
    torch.manual_seed(0)
    reference_config = _reference_config(ours, init_lora_weights=init, **extra)
    preprocess(base_ref, reference_config)
    return ours, get_peft_model(base_ref, reference_config)


def _run_corda(model, config):
    from peft.tuners.lora.corda import preprocess_corda  # imports `attrs`, which PEFT does not declare

    # PEFT's covariance hook takes one sample at a time (it squeezes a batch of 1), as in its CorDA example
    samples = [tiny_inputs(model.config.model_type, batch_size=1, seed=seed) for seed in range(3)]
    preprocess_corda(model, config, run_model=lambda: [model(**sample) for sample in samples])


def _run_loraga(model, config):
    batch = inputs_for(model.config.model_type)
    preprocess_loraga(model, config, train_step=lambda: model(**batch).loss.backward())


# PEFT's corda.py imports `attr` (the attrs package) without declaring it: CorDA runs only where attrs is installed.
NEEDS_ATTRS = pytest.mark.skipif(importlib.util.find_spec("attr") is None, reason="PEFT's CorDA imports `attrs`")
PREPROCESSED = {
    "corda": ({"corda_config": CordaConfig(corda_method="ipm")}, _run_corda),
    "lora_ga": ({"lora_ga_config": LoraGAConfig()}, _run_loraga),
}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("init", [pytest.param("corda", marks=NEEDS_ATTRS), "lora_ga"])
def test_preprocessed_init_matches_lora_and_converts(model_type, init, tmp_path):
    extra, preprocess = PREPROCESSED[init]
    batch = inputs_for(model_type)
    ours, reference = _preprocessed_pair(model_type, init, extra, preprocess)
    _assert_same_state(ours, reference)

    ours.save_pretrained(str(tmp_path / "ours" / "init"))
    reference.save_pretrained(str(tmp_path / "ref" / "init"))
    trained = _train_step(ours, batch)
    torch.testing.assert_close(trained, _train_step(reference, batch), rtol=1e-5, atol=1e-5)
    converted = _convert_and_reload(ours, model_type, tmp_path / "ours" / "init", tmp_path / "ours" / "out", batch)
    torch.testing.assert_close(converted, trained, rtol=1e-5, atol=1e-5)
    assert _saved_config(tmp_path / "ours" / "out")["r"] == 2 * OPTIONS["r"]


@pytest.mark.parametrize("init", [pytest.param("corda", marks=NEEDS_ATTRS), "lora_ga"])
def test_preprocessing_on_unresolved_targets_is_refused(init):
    extra, preprocess = PREPROCESSED[init]
    model = fresh_model("llava")
    config = VisionLoraConfig(**OPTIONS, init_lora_weights=init, **extra)
    with pytest.raises(VisionLoraConfigError, match=r"resolve_targets\(model, config\)"):
        get_peft_model(model, config)
    assert not any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.skipif(cuda_available(), reason="LoftQ is supported where CUDA is present")
def test_loftq_is_refused_without_cuda():
    with pytest.raises(VisionLoraConfigError, match="needs a CUDA device"):
        VisionLoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})


@pytest.mark.skipif(not cuda_available(), reason="PEFT's LoftQ quantizes on CUDA")
def test_loftq_matches_lora_on_cuda():
    loftq = {"loftq_bits": 4, "loftq_iter": 1}
    torch.manual_seed(0)
    ours = get_peft_model(
        fresh_model("llava"), VisionLoraConfig(**OPTIONS, init_lora_weights="loftq", loftq_config=loftq)
    )
    torch.manual_seed(0)
    reference = get_peft_model(
        fresh_model("llava"), _reference_config(ours, init_lora_weights="loftq", loftq_config=loftq)
    )
    _assert_same_state(ours, reference, atol=1e-6)


def test_card_of_a_converted_adapter_describes_the_saved_rank(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        fresh_model("llava"), VisionLoraConfig(**OPTIONS, kernel="torch", init_lora_weights="olora")
    )
    model.save_pretrained(str(tmp_path / "init"))
    _train_step(model, inputs_for("llava"))
    model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "r=8" in card and "r=4" not in card
    assert model.peft_config["default"].r == 4  # the live adapter is unchanged


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "mica"])
def test_other_inits_match_lora(model_type, init):
    """Inits that leave the base alone: same weights and logits as PEFT's LoRA, then the same training step."""
    batch = inputs_for(model_type)
    base, base_ref = fresh_model(model_type), fresh_model(model_type)  # built first: a first build seeds the RNG
    torch.manual_seed(0)
    ours = get_peft_model(base, VisionLoraConfig(**OPTIONS, kernel="torch", init_lora_weights=init))
    torch.manual_seed(0)
    reference = get_peft_model(base_ref, _reference_config(ours, init_lora_weights=init))
    _assert_same_state(ours, reference)
    torch.testing.assert_close(_logits(ours, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_train_step(ours, batch), _train_step(reference, batch), rtol=1e-5, atol=1e-5)
