"""Undo a failed strict load, so that the base model object is left as it was before PEFT touched it.

``PeftModel.from_pretrained(base, dir)`` injects empty LoRA layers into ``base`` (in place), freezes its parameters
and sets ``base.peft_config`` before it reads any weight; only then does our strict check
(:func:`.saving.check_adapter_keys`) find that the weights do not fit. Left alone, ``base`` keeps those layers and
a retry warns "Already found a peft_config attribute". :func:`snapshot` records, before injection, what the
injection changes (``requires_grad`` of every parameter, whether ``peft_config`` existed); :func:`roll_back` removes
the adapter again and restores that record. Only the adapter that failed is removed: other adapters of a
``PeftModel`` (``load_adapter`` on a model that already has some) stay.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from peft import PeftModel
from torch import nn

_ATTRIBUTE = "_vision_lora_pre_injection"


@dataclass
class InjectionSnapshot:
    requires_grad: dict[str, bool]
    had_peft_config: bool


# The two PEFT entry points that inject layers and then load weights into them. Only an injection made inside one of
# them is rolled back: an adapter made by get_peft_model and later given a bad state dict stays, with the error.
_LOADS = (PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__)


def injected_for_a_load() -> bool:
    """Whether the caller runs inside ``PeftModel.from_pretrained`` or ``PeftModel.load_adapter``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _LOADS:
            return True
        frame = frame.f_back
    return False


def snapshot(tuner: nn.Module, model: nn.Module, adapter_name: str) -> None:
    """Record, on ``tuner``, what injecting ``adapter_name`` into ``model`` is about to change."""
    records = tuner.__dict__.setdefault(_ATTRIBUTE, {})
    records[adapter_name] = InjectionSnapshot(
        {name: p.requires_grad for name, p in model.named_parameters()}, "peft_config" in model.__dict__
    )


def forget(tuner: nn.Module, adapter_name: str) -> None:
    """The adapter loaded (or was created without weights): nothing to roll back any more."""
    tuner.__dict__.get(_ATTRIBUTE, {}).pop(adapter_name, None)


def find_tuner(model: nn.Module) -> nn.Module | None:
    """The tuner (``VisionLoraModel``) behind what PEFT passes to the load hook: a PeftModel or the tuner."""
    for candidate in (model, getattr(model, "base_model", None)):
        if candidate is not None and _ATTRIBUTE in candidate.__dict__:
            return candidate
    return None


def roll_back(model: nn.Module, adapter_name: str) -> str:
    """Remove ``adapter_name`` after a failed load; returns a sentence saying what the model looks like now."""
    tuner = find_tuner(model)
    record = tuner.__dict__[_ATTRIBUTE].pop(adapter_name, None) if tuner is not None else None
    if record is None:
        return (
            f"The LoRA layers of '{adapter_name}' were injected before loading and are still in the model; call "
            "unload() or rebuild the base model before trying another adapter."
        )
    others = [name for name in tuner.peft_config if name != adapter_name]
    if others:
        tuner.delete_adapter(adapter_name)
        owner = model if hasattr(model, "peft_config") else tuner
        owner.peft_config.pop(adapter_name, None)
        return f"Adapter '{adapter_name}' was removed again; the model's other adapters {others} are unchanged."
    base = tuner.model
    tuner._unload_and_optionally_merge(merge=False, progressbar=False)
    for name, parameter in base.named_parameters():
        if name in record.requires_grad:
            parameter.requires_grad_(record.requires_grad[name])
    if not record.had_peft_config:
        base.__dict__.pop("peft_config", None)
    return "The base model was left as it was: the LoRA layers injected for this load were removed again."
