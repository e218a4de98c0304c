"""Strict adapter loading: every adapter weight lands on a module, every adapted module gets its weights.

``VisionLoraModel._remap_adapter_state_dict_for_load`` (PEFT's per-tuner load hook) calls :func:`remap_and_check`;
anything but an exact fit raises :class:`~peft_vision_lora.errors.AdapterLoadError` naming the keys. Keys saved under
an older transformers module layout (``language_model.model.layers`` before ``model.language_model.layers``) are
renamed with transformers' own checkpoint-conversion rules for the model, and the rename is logged. Part of the
tuner because PEFT calls it from inside ``load_adapter``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..errors import AdapterLoadError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_SHOWN_KEYS = 12


def adapter_parameter_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """State-dict keys that belong to ``adapter_name``: its LoRA tensors and its ``modules_to_save`` copies."""
    state = model.state_dict()
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    keys = set(_filter_state_dict_by_key_prefixes(state, prefixes))
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):  # a wrapper without this adapter has no such keys
            prefix = f"{name}.modules_to_save.{adapter_name}."
            keys.update(k for k in state if k.startswith(prefix))
    return keys


def _legacy_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """transformers' key renames for this model class (module-layout changes between versions), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(getattr(base, "config", None), "model_type"):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers < 5
        return None
    renamings = [c for c in get_model_conversion_mapping(base) if isinstance(c, WeightRenaming)]
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


def _rename_summary(renames: dict[str, str]) -> str:
    """``old.prefix.* -> new.prefix.* (N keys)`` lines: the part before the common tail of each pair."""
    counts: Counter[tuple[str, str]] = Counter()
    for old, new in renames.items():
        old_parts, new_parts = old.removeprefix(PEFT_PREFIX).split("."), new.removeprefix(PEFT_PREFIX).split(".")
        shared = len(os.path.commonprefix([old_parts[::-1], new_parts[::-1]]))  # common trailing segments
        # when one side is a suffix of the other, show the first shared segment too
        tail = min(shared, len(old_parts) - 1, len(new_parts) - 1)
        counts[(".".join(old_parts[: len(old_parts) - tail]), ".".join(new_parts[: len(new_parts) - tail]))] += 1
    return "; ".join(f"{old}.* -> {new}.* ({n} keys)" for (old, new), n in sorted(counts.items()))


def rename_legacy_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> key in the model's current layout, for the given keys that transformers would rename."""
    rename = _legacy_renamer(model)
    if rename is None:
        return {}
    renames = {}
    for key in keys:
        bare = key.removeprefix(PEFT_PREFIX)
        new = rename(bare)
        if new != bare:
            renames[key] = key[: len(key) - len(bare)] + new
    return renames


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"[{shown}{f', ... ({len(keys) - _SHOWN_KEYS} more)' if len(keys) > _SHOWN_KEYS else ''}]"


def check_adapter_keys(model: nn.Module, adapter_name: str, remapped: dict[str, Any], base_model: str | None) -> None:
    """Raise :class:`AdapterLoadError` unless ``remapped`` (model-form keys) covers the adapter exactly."""
    # PEFT's remap gives keys in the model's own form (prefixed under a PeftModel, bare on a bare model)
    model_keys = set(model.state_dict())
    unexpected = sorted(k for k in remapped if k not in model_keys)
    missing = sorted(k for k in adapter_parameter_keys(model, adapter_name) if k not in remapped)
    if not unexpected and not missing:
        return
    lines = [f"Adapter '{adapter_name}' does not fit this model; nothing was loaded."]
    if unexpected:
        lines.append(f"{len(unexpected)} adapter weight(s) match no module of the model: {_format_keys(unexpected)}.")
    if missing:
        lines.append(f"{len(missing)} adapted parameter(s) got no weights: {_format_keys(missing)}.")
    lines.append(
        f"Load the adapter onto the base model it was trained on (adapter_config.json says "
        f"base_model_name_or_path={base_model!r}) with a transformers version that uses the same module names, or "
        "re-save it from a model with this layout."
    )
    raise AdapterLoadError(" ".join(lines))


def remap_and_check(
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    model: nn.Module,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor],
    base_model: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run PEFT's key remap; rename keys of an older module layout if needed; then demand an exact fit."""
    remapped = remap(state_dict)
    model_keys = set(model.state_dict())
    # only keys that fit no module are renamed (transformers' rules leave current-layout keys as they are)
    stray = [k for k in remapped if k not in model_keys]  # pragma: no mutate
    renames = rename_legacy_keys(model, stray)
    if renames:
        logger.warning(
            "Adapter '%s' was saved with an older transformers module layout; remapped %d key(s): %s",
            adapter_name,
            len(renames),
            _rename_summary(renames),
        )
        remapped = remap({renames.get(k, k): v for k, v in state_dict.items()})
    check_adapter_keys(model, adapter_name, remapped, base_model)
    return remapped
