"""Export a VISION_LORA adapter as plain PEFT LoRA: same weights, ``peft_type: LORA``, loads without this package.

A VISION_LORA adapter is already LoRA underneath (the tuner compiles its flags into a regex plus per-component
``rank_pattern``/``alpha_pattern``), so the export copies the LoRA fields of the config, lists the adapted modules
explicitly in ``target_modules`` and keeps the tensors as they are. Options for serving stacks:

- ``language_only=True`` (or ``components=...``) keeps the adapters of the language model only, for servers that
  accept LoRA only there (see docs/sharing.md); fully trained modules (``modules_to_save``) are dropped with them.
- ``fold_scaling=True`` multiplies each module's ``lora_B`` by its own ``alpha/r`` (or ``alpha/sqrt(r)`` with
  rsLoRA) and sets every module's alpha equal to its rank, so loaders that read one global ``lora_alpha/r`` and
  ignore ``rank_pattern``/``alpha_pattern`` (vLLM's ``PEFTHelper``) compute the same outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn

from ..resolve.names import check_known_components
from .atomic_save import atomic_directory
from .card import WEIGHTS_NAME, module_of, saved_component_of, write_model_card

LANGUAGE_ONLY = ("language",)
# Bookkeeping fields of PeftConfig that the new config sets for itself.
_NOT_COPIED = {"peft_type", "peft_version", "auto_mapping"}


def _load_source(model_or_dir: nn.Module | str | os.PathLike, adapter_name: str) -> tuple[Any, dict[str, Any]]:
    """The adapter's config and its checkpoint-format tensors, from a PeftModel or a saved adapter folder."""
    if isinstance(model_or_dir, nn.Module):
        configs = getattr(model_or_dir, "peft_config", None)
        if not isinstance(configs, dict) or adapter_name not in configs:
            raise ValueError(
                f"export_lora needs a PeftModel with an adapter named {adapter_name!r} or an adapter folder; got "
                f"{type(model_or_dir).__name__} with adapters {sorted(configs or {})}."
            )
        state = get_peft_model_state_dict(model_or_dir, adapter_name=adapter_name)
        return configs[adapter_name], {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    folder = Path(model_or_dir)
    if adapter_name != "default" and (folder / adapter_name / "adapter_config.json").is_file():
        folder = folder / adapter_name
    weights = folder / WEIGHTS_NAME
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json + {WEIGHTS_NAME}; pass the folder that save_pretrained wrote "
            "(adapters saved as .bin are not supported: re-save with safe_serialization=True)."
        )
    return PeftConfig.from_pretrained(str(folder)), load_file(str(weights))


def _keep_components(
    weights: dict[str, torch.Tensor], config: Any, keep: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    targets: dict[str, str] = getattr(config, "component_targets", None) or {}
    if not targets:
        raise ValueError(
            "This adapter does not record which modules belong to which component (no `component_targets` in its "
            "config: saved by an older peft-vision-lora, or not a VISION_LORA adapter). Load it onto its base model "
            "and pass the PeftModel to export_lora, or re-save it."
        )
    # LoRA tensors by their module's component; fully trained modules (modules_to_save) are the projector's.
    kept = {
        k: v
        for k, v in weights.items()
        if (saved_component_of(module_of(k), targets) in keep if ".lora_" in k else "projector" in keep)
    }
    if not any(".lora_" in k for k in kept):
        raise ValueError(f"No adapted module belongs to {list(keep)}; the adapter covers {sorted(targets)}.")
    return kept, {c: p for c, p in targets.items() if c in keep}


def _module_ranks(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {module_of(k): int(v.shape[0]) for k, v in weights.items() if ".lora_A." in k}


def _rank_and_alpha(config: Any, module: str) -> tuple[int, float]:
    """What PEFT would give ``module`` from this config (the first matching pattern key wins, as in LoraModel)."""
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    rank = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.lora_alpha)
    return rank, alpha


def _exact_pattern(modules: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def _plain_config(source: Any, ranks: dict[str, int], modules_to_save: list[str] | None) -> LoraConfig:
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - _NOT_COPIED
    values = {name: getattr(source, name) for name in fields if hasattr(source, name)}
    modules = sorted(ranks)

    def used(patterns: dict[str, Any] | None) -> dict[str, Any]:  # PEFT matches keys as `(.*\.)?(KEY)$`
        return {p: v for p, v in (patterns or {}).items() if any(re.fullmatch(rf"(.*\.)?({p})", m) for m in modules)}

    values.update(
        target_modules=modules,
        rank_pattern=used(source.rank_pattern),
        alpha_pattern=used(source.alpha_pattern),
        modules_to_save=modules_to_save or None,
        # the module list is exact: the layer filter was compiled into it, and PEFT would re-apply it to full names
        layers_to_transform=None,
        layers_pattern=None,
    )
    return LoraConfig(**values)


def _fold_scaling(config: LoraConfig, weights: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    """Scale each ``lora_B`` by its module's scaling; afterwards every module has alpha == r (scaling 1)."""
    if config.use_dora:
        raise ValueError("fold_scaling cannot be used with DoRA: the magnitude vector depends on the scaling.")
    for key in weights:
        if ".lora_B." in key:
            rank, alpha = _rank_and_alpha(config, module_of(key))
            scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            weights[key] = weights[key] * scale
    top = max(ranks.values())
    by_rank: dict[int, list[str]] = {}
    for module, rank in ranks.items():
        if rank != top:
            by_rank.setdefault(rank, []).append(module)
    config.r, config.lora_alpha, config.use_rslora = top, top, False
    config.rank_pattern = {_exact_pattern(mods): rank for rank, mods in sorted(by_rank.items())}
    config.alpha_pattern = dict(config.rank_pattern)


def _sort_target_modules(path: Path) -> None:
    """LoraConfig keeps target_modules as a set; write them sorted so that exports are reproducible."""
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _check_ranks(config: LoraConfig, ranks: dict[str, int]) -> None:
    wrong = {m: (r, _rank_and_alpha(config, m)[0]) for m, r in ranks.items() if _rank_and_alpha(config, m)[0] != r}
    if wrong:
        sample = dict(list(wrong.items())[:5])
        raise ValueError(f"Exported rank_pattern disagrees with the weights (module: (weights, config)): {sample}.")


def export_lora(
    model_or_dir: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    language_only: bool = False,
    components: tuple[str, ...] | list[str] | None = None,
    fold_scaling: bool = False,
) -> Path:
    """Write ``model_or_dir``'s adapter to ``out_dir`` as plain PEFT LoRA (atomically); returns ``out_dir``.

    ``model_or_dir`` is a PeftModel or a folder written by ``save_pretrained``. The result has ``peft_type: LORA``,
    the adapted modules listed in ``target_modules``, the ``rank_pattern``/``alpha_pattern`` they need, the same
    tensors (unless ``fold_scaling``) and a model card; vanilla PEFT loads it without peft-vision-lora.
    """
    if language_only and components is not None:
        raise ValueError("Pass either language_only=True or components=[...], not both.")
    keep = LANGUAGE_ONLY if language_only else (tuple(components) if components is not None else None)
    if keep is not None:
        check_known_components("components", keep)
    if not isinstance(model_or_dir, nn.Module) and Path(model_or_dir).resolve() == Path(out_dir).resolve():
        raise ValueError("out_dir must differ from the adapter folder: the export would replace the original.")

    config, weights = _load_source(model_or_dir, adapter_name)
    targets: dict[str, str] = dict(getattr(config, "component_targets", None) or {})
    if keep is not None:
        weights, targets = _keep_components(weights, config, keep)
    ranks = _module_ranks(weights)
    saved_modules = sorted({module_of(k) for k in weights if ".lora_" not in k})
    keeps_full = saved_modules and (keep is None or "projector" in keep)
    plain = _plain_config(config, ranks, config.modules_to_save if keeps_full else None)
    _check_ranks(plain, ranks)
    if fold_scaling:
        _fold_scaling(plain, weights, ranks)
        _check_ranks(plain, ranks)

    with atomic_directory(out_dir) as staged:
        plain.save_pretrained(str(staged))
        _sort_target_modules(staged / "adapter_config.json")
        save_file(weights, str(staged / WEIGHTS_NAME), metadata={"format": "pt"})
        write_model_card(staged, plain, component_targets=targets)
    return Path(out_dir)


def run_export(args: argparse.Namespace) -> int:
    """``peft-vision-lora export ADAPTER_DIR OUT_DIR [--language-only] [--fold-scaling]``; errors propagate to the
    CLI, which prints each once."""
    if not Path(args.adapter_dir).is_dir():
        raise FileNotFoundError(f"folder not found: {args.adapter_dir}")
    out = export_lora(args.adapter_dir, args.out_dir, language_only=args.language_only, fold_scaling=args.fold_scaling)
    config = LoraConfig.from_pretrained(str(out))
    print(
        f"Wrote plain LoRA ({len(config.target_modules)} modules, peft_type {config.peft_type.value}) to {out}; "
        "load it with peft.PeftModel.from_pretrained, no peft-vision-lora needed."
    )
    return 0
