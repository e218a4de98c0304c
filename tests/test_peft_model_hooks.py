"""The PeftModel wrapping: other tuners untouched, PEFT's own functions restorable, and our card on every save."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import fresh_model
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.kernels import dispatch
from peft_vision_lora.sharing import atomic_save, peft_model_hooks, portable

MODEL_TYPE = "llava"
WRAPPED = ("save_pretrained", "push_to_hub", "create_or_update_model_card")


@pytest.fixture
def hooks_off():
    peft_model_hooks.uninstall()
    try:
        yield
    finally:
        peft_model_hooks.install()


def test_uninstall_puts_back_the_very_functions_peft_defined():
    originals = {name: getattr(PeftModel, name).__wrapped__ for name in WRAPPED}
    peft_model_hooks.uninstall()
    try:
        assert {name: getattr(PeftModel, name) for name in WRAPPED} == originals
        assert not peft_model_hooks.installed()
        peft_model_hooks.uninstall()  # a second call changes nothing
        assert {name: getattr(PeftModel, name) for name in WRAPPED} == originals
    finally:
        peft_model_hooks.install()
    assert peft_model_hooks.installed()
    assert {name: getattr(PeftModel, name).__wrapped__ for name in WRAPPED} == originals
    peft_model_hooks.install()  # idempotent: no wrapper around a wrapper
    assert {name: getattr(PeftModel, name).__wrapped__ for name in WRAPPED} == originals


def test_importing_the_package_wraps_and_uninstall_restores_in_a_fresh_process():
    code = (
        "import peft\n"
        "before = {n: getattr(peft.PeftModel, n) for n in ('save_pretrained', 'push_to_hub')}\n"
        "import peft_vision_lora\n"
        "from peft_vision_lora.sharing import peft_model_hooks\n"
        "assert all(getattr(peft.PeftModel, n) is not f for n, f in before.items())\n"
        "peft_model_hooks.uninstall()\n"
        "assert all(getattr(peft.PeftModel, n) is f for n, f in before.items())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_plain_lora_saves_exactly_as_peft_does(tmp_path, monkeypatch):
    def no_staging(*args, **kwargs):
        raise AssertionError("a plain LoRA save must not be staged")

    monkeypatch.setattr(peft_model_hooks, "atomic_save_folder", no_staging)
    monkeypatch.setattr(peft_model_hooks, "write_model_card", no_staging)
    model = get_peft_model(fresh_model(MODEL_TYPE), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "plain")
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert "vision-lora" not in (card.data.tags or [])


def test_our_card_is_written_beside_every_saved_adapter(tmp_path):
    model = get_peft_model(fresh_model(MODEL_TYPE), VisionLoraConfig(r=4, task="vqa"))
    model.add_adapter("vision", VisionLoraConfig(r=2, task="domain_adaptation"))
    model.save_pretrained(tmp_path / "out")
    default = ModelCard.load(tmp_path / "out" / "README.md")
    second = ModelCard.load(tmp_path / "out" / "vision" / "README.md")
    assert "vision-lora-strategy:language" in default.data.tags
    assert "vision-lora-strategy:vision" in second.data.tags
    assert "## Adapted components" in default.text and "## Adapted components" in second.text


def test_without_the_hooks_our_adapter_saves_in_place_with_pefts_card(tmp_path, hooks_off, monkeypatch):
    monkeypatch.setattr(atomic_save, "atomic_directory", lambda *a, **k: pytest.fail("staged without the hooks"))
    model = get_peft_model(fresh_model(MODEL_TYPE), VisionLoraConfig(r=4, task="vqa"))
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "vision-lora" not in (card.data.tags or []) and "## Adapted components" not in card.text


def test_a_broken_triton_module_raises_instead_of_falling_back(monkeypatch):
    """Only triton's own ImportError means "no Triton"; our kernel module's errors surface where it is used."""
    if not dispatch.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    monkeypatch.delattr(sys.modules["peft_vision_lora.kernels"], "triton_lora", raising=False)
    monkeypatch.setitem(sys.modules, "peft_vision_lora.kernels.triton_lora", None)  # import now fails
    x, weight, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ImportError, match="triton_lora"):
        dispatch.lora_linear(x, weight, None, a, b, 1.0, kernel="triton")
    # the torch path never needs it
    expected = x @ (weight + b @ a).T
    torch.testing.assert_close(dispatch.lora_linear(x, weight, None, a, b, 1.0, kernel="torch"), expected)


def test_portable_uninstall_restores_pefts_get_peft_type():
    from peft.config import PeftConfigMixin

    wrapped = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    original = wrapped.__wrapped__
    portable.uninstall()
    try:
        assert PeftConfigMixin.__dict__["_get_peft_type"].__func__ is original
        portable.uninstall()
        assert PeftConfigMixin.__dict__["_get_peft_type"].__func__ is original
    finally:
        portable.install()
    assert PeftConfigMixin.__dict__["_get_peft_type"].__func__.__wrapped__ is original
