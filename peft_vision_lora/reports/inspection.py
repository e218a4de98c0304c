"""``peft-vision-lora inspect MODEL_TYPE_OR_PATH``: what each strategy would train, before any weight exists.

The model is built on the meta device (module tree and shapes, no memory, no download): from a transformers
``model_type`` (a tiny shrunk config, or with ``--full-size`` the default config, which is a full-size model: the
default ``LlavaConfig`` is a 32-layer 4096-wide Llama plus a 24-layer CLIP-L), or from the ``config.json`` of a
local model folder. It prints the component tree with module counts, then the LoRA parameters of each strategy.
"""

from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass, field

from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..resolve.components import ComponentMap, layer_slot, resolve_components, unwrap_model
from ..resolve.names import COMPONENT_FLAGS, COMPONENTS, MODULE_KINDS, OTHER
from ..resolve.targets import compile_targets
from ..tuner.config import VisionLoraConfig
from ..zoo.catalog import ZOO_MODEL_TYPES, ZooBuildError, build_full_size_on_meta, build_zoo_model
from .adapter_summary import adapter_summary, is_adapter_folder
from .strategies import DESIGN_CLAIMS, STRATEGIES

# Strategies beyond the design's three: the projector alone (LoRA), and the audio tower of omni models.
ALL_STRATEGIES: dict[str, dict[str, bool]] = {
    **STRATEGIES,
    "projector": {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_projector": True},
    "audio": {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_audio_layers": True},
}


@dataclass(frozen=True)
class ComponentRow:
    """One component of a model: where it is, how it was found, and its adaptable linears by kind."""

    component: str
    paths: tuple[str, ...]
    how: str
    kinds: dict[str, int]
    stacks: dict[str, int]  # numbered stack -> number of layers

    @property
    def linears(self) -> int:
        return sum(self.kinds.values())


@dataclass(frozen=True)
class StrategyCount:
    """What one strategy adapts at rank ``r``; ``reason`` says why it adapts nothing on this model."""

    strategy: str
    modules: int = 0
    params: int = 0
    per_component: dict[str, int] = field(default_factory=dict)
    reason: str = ""


class InspectArgumentError(ValueError):
    """``inspect`` was given something it cannot read; the CLI exits with status 2, as for a bad argument."""

    exit_status = 2


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~")) or (os.altsep is not None and os.altsep in text)


def unknown_model_message(model: str) -> str:
    """Why ``model`` is not readable, with the closest model_types when it looks like a typo."""
    if _looks_like_path(model):
        return (
            f"folder not found: {model}. Nothing is downloaded (a Hub id is not fetched): give a local model or "
            "adapter folder, or a model_type such as llava."
        )
    close = difflib.get_close_matches(model, ZOO_MODEL_TYPES, n=3, cutoff=0.6)
    if close:
        return f"unknown model_type {model!r}; did you mean {' or '.join(map(repr, close))}?"
    return (
        f"{model!r} is neither a local folder nor an image-text-to-text model_type. Nothing is downloaded: give a "
        f"folder with config.json or adapter_config.json, or one of: {', '.join(ZOO_MODEL_TYPES)}."
    )


def load_for_inspect(model: str, full_size: bool = False) -> tuple[PreTrainedModel, str]:
    """A meta-device model for ``model`` (a model_type or a local folder with config.json) and where it came from."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise InspectArgumentError(
                f"{model} has no config.json (a model folder) and no adapter_config.json (an adapter folder)."
            )
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        return build_full_size_on_meta(config), f"config.json of {model}"
    if model not in ZOO_MODEL_TYPES:
        raise InspectArgumentError(unknown_model_message(model))
    if full_size:
        return build_full_size_on_meta(model), "default (full-size) config"
    tiny = build_zoo_model(model, device="meta", max_params=None)
    return tiny, "tiny shrunk config (use --full-size for real sizes)"


def _everything_config(components: ComponentMap) -> VisionLoraConfig:
    return VisionLoraConfig(
        r=1,
        finetune_vision_layers=bool(components["vision"]),
        finetune_language_layers=bool(components["language"]),
        finetune_projector=bool(components["projector"]),
        finetune_qformer=bool(components["qformer"]),
        finetune_audio_layers=bool(components["audio"]),
    )


def component_rows(model: nn.Module) -> list[ComponentRow]:
    """Each found component with its adaptable linears (attention / mlp / other) and numbered stacks."""
    model = unwrap_model(model)
    components = resolve_components(model)
    modules = dict(model.named_modules())
    try:
        targets = compile_targets(model, _everything_config(components), components).targets
    except ValueError:  # e.g. a projector without linears: count per component instead
        targets = ()
        for component in COMPONENTS:
            flags = {f: False for f in ("finetune_vision_layers", "finetune_language_layers")}
            try:
                targets += compile_targets(model, _single(component, flags), components).targets
            except ValueError:
                continue
    rows = []
    for component in COMPONENTS:
        if not components[component]:
            continue
        kinds: dict[str, int] = dict.fromkeys(MODULE_KINDS, 0)
        stacks: dict[str, int] = {}
        for target in targets:
            if target.component != component:
                continue
            kind = target.kind if target.kind in kinds else OTHER
            kinds[kind] += 1
            slot = layer_slot(components, modules, component, target.name)
            if slot is not None:
                stacks[slot[0]] = slot[2]
        how = components.how.get(component, "")
        rows.append(ComponentRow(component, components[component], how, kinds, stacks))
    return rows


def _single(component: str, off: dict[str, bool]) -> VisionLoraConfig:
    return VisionLoraConfig(r=1, **{**off, COMPONENT_FLAGS[component]: True})


def strategy_counts(model: nn.Module, r: int = 16) -> dict[str, StrategyCount]:
    """LoRA modules and parameters each strategy would train at rank ``r`` (shapes only: meta models work)."""
    model = unwrap_model(model)
    components = resolve_components(model)
    counts = {}
    for strategy, flags in ALL_STRATEGIES.items():
        if strategy == "audio" and not components["audio"]:
            continue
        missing = [
            c for c in ("vision", "language", "projector") if flags.get(COMPONENT_FLAGS[c]) and not components[c]
        ]
        if missing:
            names = {"vision": "vision tower", "language": "language model", "projector": "projector"}
            reason = "no " + " and no ".join(names[c] for c in missing) + " on this model"
            counts[strategy] = StrategyCount(strategy, reason=reason)
            continue
        try:
            plan = compile_targets(model, VisionLoraConfig(r=r, lora_alpha=r, **flags), components)
        except ValueError as error:  # e.g. a projector with no linear layer
            counts[strategy] = StrategyCount(strategy, reason=str(error).split(": ")[0].split(". ")[0])
            continue
        per_component: dict[str, int] = {}
        for target in plan.targets:
            per_component[target.component] = per_component.get(target.component, 0) + target.lora_params
        counts[strategy] = StrategyCount(strategy, len(plan.targets), sum(per_component.values()), per_component)
    return counts


def fraction_of_full(counts: dict[str, StrategyCount], strategy: str) -> float | None:
    """Share of the vision+language strategy's LoRA parameters that ``strategy`` trains (None when undefined)."""
    full = counts["vision+language"].params
    return counts[strategy].params / full if full and counts[strategy].params else None


def format_components(rows: list[ComponentRow], components: ComponentMap) -> str:
    lines = [f"{'component':<16} {'linears':>7} {'attn':>5} {'mlp':>5} {'other':>5}  found by    path(s) [layers]"]
    for row in rows:
        stacks = ", ".join(f"{s} [{n}]" for s, n in row.stacks.items())
        paths = ", ".join(row.paths) if len(row.paths) <= 3 else f"{', '.join(row.paths[:3])}, +{len(row.paths) - 3}"
        k = row.kinds
        lines.append(
            f"{row.component:<16} {row.linears:>7} {k['attention']:>5} {k['mlp']:>5} {k['other']:>5}  "
            f"{row.how:<10}  {paths}" + (f"\n{'':<55}layers: {stacks}" if stacks else "")
        )
    if components.excluded:
        lines.append(f"{'(no component)':<16} never targeted: {', '.join(components.excluded)}")
    return "\n".join(lines)


def format_strategies(counts: dict[str, StrategyCount], r: int) -> str:
    lines = [f"LoRA parameters per strategy at r={r}:"]
    lines.append(f"{'strategy':<16} {'modules':>8} {'params':>15} {'of full':>8}")
    for name, count in counts.items():
        share = fraction_of_full(counts, name)
        claim = DESIGN_CLAIMS.get(name)
        claim_text = f"  (design claim {claim[0]:.0%}-{claim[1]:.0%})" if claim else ""
        if count.reason:
            lines.append(f"{name:<16} {'-':>8} {'-':>15} {'':>8}  {count.reason}")
            continue
        share_text = f"{share:>8.1%}" if share is not None else f"{'':>8}"
        lines.append(f"{name:<16} {count.modules:>8} {count.params:>15,} {share_text}{claim_text}")
        split = ", ".join(f"{c} {n:,}" for c, n in sorted(count.per_component.items()))
        if len(count.per_component) > 1:
            lines.append(f"{'':<16} {split}")
    return "\n".join(lines)


def inspect_report(model: nn.Module, r: int = 16, source: str = "") -> str:
    """The full text ``inspect`` prints for ``model``."""
    model = unwrap_model(model)
    components = resolve_components(model)
    total = sum(p.numel() for p in model.parameters())
    header = f"{components.model_type} ({type(model).__name__}, {source or 'given model'}): {total:,} parameters"
    rows = component_rows(model)
    return "\n\n".join([header, format_components(rows, components), format_strategies(strategy_counts(model, r), r)])


def run_inspect(args: argparse.Namespace) -> int:
    """CLI entry: print the report for a model or an adapter folder; errors propagate to the CLI, which prints them
    once (exit status 2 for what cannot be read, 1 when a model cannot be built)."""
    if is_adapter_folder(args.model):
        print(adapter_summary(args.model))
        return 0
    try:
        model, source = load_for_inspect(args.model, full_size=args.full_size)
    except ZooBuildError as error:
        raise ValueError(str(error)) from error
    print(inspect_report(model, r=args.rank, source=source))
    return 0
