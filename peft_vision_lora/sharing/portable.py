"""Portable adapters: a folder that vanilla PEFT loads as plain LoRA and this package restores as VISION_LORA.

Format (decided for issue 19): ``adapter_config.json`` is a plain ``LoraConfig`` (``peft_type: LORA``): the adapted
modules listed in ``target_modules``, the ``rank_pattern``/``alpha_pattern`` that give each its rank, the LoRA options
of the adapter; the weights are unchanged (LoRA's key names). The full ``VisionLoraConfig`` (flags, components,
per-component ranks, ``component_targets``) is kept beside it in ``vision_lora_config.json``, a file PEFT never reads.
A sidecar rather than extra keys in ``adapter_config.json``: PEFT warns about unknown keys there and tells the user
to upgrade PEFT, which would be wrong advice.

- Without this package, ``PeftModel.from_pretrained(base, folder)`` reads ``adapter_config.json`` and loads plain
  LoRA: same modules, ranks, scalings and tensors, so the same logits.
- With it imported, :func:`install` makes PEFT's ``PeftConfig._get_peft_type`` answer ``VISION_LORA`` for a LoRA
  folder (or Hub repo) with the sidecar, and ``VisionLoraConfig.from_json_file`` reads the sidecar instead of
  ``adapter_config.json``; the adapter comes back as the ``VisionLoraConfig`` it was saved from.

``model.push_to_hub`` always uploads this format; ``model.save_pretrained(dir, portable=True)`` writes it locally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peft.config import PeftConfigMixin
from peft.utils import CONFIG_NAME

from ..tuner.config import SIDECAR_NAME
from .card import WEIGHTS_NAME, module_of, weight_shapes, write_model_card
from .export import _check_ranks, _plain_config, _sort_target_modules

_WRAPPED = "__peft_vision_lora_portable__"


def make_portable(folder: str | os.PathLike, config: Any, *, repo_id: str | None = None) -> None:
    """Turn an adapter folder written by ``save_pretrained`` into the portable format, in place.

    ``config`` is the adapter's ``VisionLoraConfig``; its JSON (as PEFT wrote it) moves to the sidecar and a plain
    ``LoraConfig`` built from it and the weights' shapes takes its place. The card is rewritten to show both ways of
    loading.
    """
    folder = Path(folder)
    shapes = weight_shapes(folder / WEIGHTS_NAME)
    ranks = {module_of(key): shape[0] for key, shape in shapes.items() if ".lora_A." in key}
    fully_trained = any(".lora_" not in key for key in shapes)
    plain = _plain_config(config, ranks, config.modules_to_save if fully_trained else None)
    _check_ranks(plain, ranks)
    os.replace(folder / CONFIG_NAME, folder / SIDECAR_NAME)
    plain.save_pretrained(str(folder))
    _sort_target_modules(folder / CONFIG_NAME)
    write_model_card(folder, config, repo_id=repo_id)


def make_folder_portable(folder: str | os.PathLike, adapters: dict[str, Any]) -> None:
    """:func:`make_portable` for each ``VISION_LORA`` adapter that ``save_pretrained`` wrote into ``folder``."""
    for name, config in adapters.items():
        make_portable(Path(folder) if name == "default" else Path(folder) / name, config)


def find_sidecar(model_id: str | os.PathLike, **hub_kwargs: Any) -> Path | None:
    """The sidecar of a local folder or Hub repo (downloaded beside its ``adapter_config.json``), or None."""
    subfolder = hub_kwargs.get("subfolder")
    local = Path(model_id, subfolder) if subfolder else Path(model_id)
    if (local / CONFIG_NAME).is_file():
        return local / SIDECAR_NAME if (local / SIDECAR_NAME).is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(model_id), SIDECAR_NAME, **hub_kwargs))
    except Exception:  # no sidecar in that repo (any plain LoRA repo), or offline without it cached
        return None


def install() -> None:
    """Wrap ``PeftConfigMixin._get_peft_type`` so that a portable LoRA folder is routed to ``VISION_LORA``."""
    current = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    if getattr(current, _WRAPPED, False):
        return

    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs: Any):
        peft_type = current(cls, model_id, **hf_hub_download_kwargs)
        if peft_type != "LORA":
            return peft_type
        sidecar = find_sidecar(model_id, **hf_hub_download_kwargs)
        return json.loads(sidecar.read_text())["peft_type"] if sidecar is not None else peft_type

    setattr(_get_peft_type, _WRAPPED, True)
    _get_peft_type.__wrapped__ = current
    _get_peft_type.__doc__ = current.__doc__
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)


def uninstall() -> None:
    """Put PEFT's own ``_get_peft_type`` back; a second call changes nothing."""
    current = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    if getattr(current, _WRAPPED, False):
        PeftConfigMixin._get_peft_type = classmethod(current.__wrapped__)
