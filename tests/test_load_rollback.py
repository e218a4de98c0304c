"""Errors at the right time: a failed strict load leaves the base model as it was; kernel='triton' where it can
never run is refused when the model is wrapped, not at the first forward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_vision_lora import AdapterLoadError, VisionLoraConfig

WEIGHTS = "adapter_model.safetensors"
ROOT = Path(__file__).resolve().parent.parent


def _saved(tmp_path, name="adapter", **overrides):
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False, finetune_projector="full", component_r={"vision": 2})
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        logits = model(**inputs_for("llava")).logits
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, logits


def _broken_copy(folder, tmp_path):
    """The same adapter with one LoRA weight missing: the strict check refuses it."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    weights = load_file(folder / WEIGHTS)
    dropped = next(k for k in sorted(weights) if "lora_B" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / WEIGHTS, metadata={"format": "pt"})
    return broken


def _state(model):
    return {
        "modules": {name: type(m) for name, m in model.named_modules()},
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "attributes": set(model.__dict__),
    }


def _assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grad"] == before["grad"]
    assert after["attributes"] == before["attributes"]


def test_failed_from_pretrained_leaves_the_base_model_as_it_was(tmp_path):
    folder, logits = _saved(tmp_path)
    broken = _broken_copy(folder, tmp_path)
    base = fresh_model("llava").eval()
    before = _state(base)

    with pytest.raises(AdapterLoadError, match="left as it was") as error:
        PeftModel.from_pretrained(base, broken)
    assert "1 adapted parameter(s) got no weights" in str(error.value)
    _assert_same(before, _state(base))

    with warnings.catch_warnings():  # the retry on the same object is a clean first load
        warnings.simplefilter("error", UserWarning)
        model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for("llava")).logits, logits, rtol=0, atol=0)


def test_failed_load_adapter_removes_only_that_adapter(tmp_path):
    folder, logits = _saved(tmp_path)
    broken = _broken_copy(folder, tmp_path)
    model = PeftModel.from_pretrained(fresh_model("llava"), folder).eval()
    before = _state(model)

    with pytest.raises(AdapterLoadError, match=r"Adapter 'second' was removed again.*\['default'\] are unchanged"):
        model.load_adapter(broken, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    _assert_same(before, _state(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for("llava")).logits, logits, rtol=0, atol=0)


def test_bad_state_dict_on_a_model_made_by_get_peft_model_keeps_the_adapter(tmp_path):
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4))
    weights = load_file(_saved(tmp_path, r=4, component_r={}, finetune_projector=False)[0] / WEIGHTS)
    weights.pop(next(k for k in sorted(weights) if "lora_A" in k))
    with pytest.raises(AdapterLoadError, match="still in the model"):
        set_peft_model_state_dict(model, weights)
    assert list(model.peft_config) == ["default"]  # the user's own adapter is not taken away


REFUSED = textwrap.dedent(
    """
    import torch
    torch.cuda.is_available = lambda: False  # this machine has no GPU anyway; make the check explicit on any host
    import peft_vision_lora
    from peft import get_peft_model
    from peft_vision_lora import VisionLoraConfig
    from peft_vision_lora.tiny_models import build_tiny_vlm
    base = build_tiny_vlm("llava", seed=0)
    names = {n: type(m) for n, m in base.named_modules()}
    try:
        get_peft_model(base, VisionLoraConfig(r=4, kernel="triton"))
    except ValueError as error:
        print("REFUSED", error)
    print("UNTOUCHED", names == {n: type(m) for n, m in base.named_modules()})
    model = get_peft_model(base, VisionLoraConfig(r=4, kernel="auto"))
    print("AUTO", model(**__import__("peft_vision_lora.tiny_models").tiny_models.tiny_inputs("llava")).logits.shape)
    """
)


def test_triton_kernel_without_cuda_is_refused_when_wrapping():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    result = subprocess.run([sys.executable, "-c", REFUSED], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED kernel='triton' cannot run here" in result.stdout
    assert "kernel='auto'" in result.stdout
    assert "UNTOUCHED True" in result.stdout
    assert "AUTO torch.Size" in result.stdout
