"""Per-component trainable-parameter report: what each strategy really trains on a given model.

The design claims language-only LoRA is about 50-70% of full-VLM LoRA parameters and vision-only about 30-50%.
This module computes the real figures on the model at hand (meta-device models work: only shapes are read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..resolve.components import resolve_components, unwrap_model
from ..resolve.targets import compile_targets
from ..tuner.config import VisionLoraConfig

DESIGN_CLAIMS = {"language": (0.50, 0.70), "vision": (0.30, 0.50)}
STRATEGIES: dict[str, dict[str, bool]] = {
    "vision+language": {"finetune_vision_layers": True, "finetune_language_layers": True},
    "language": {"finetune_vision_layers": False, "finetune_language_layers": True},
    "vision": {"finetune_vision_layers": True, "finetune_language_layers": False},
}


@dataclass(frozen=True)
class StrategyRow:
    strategy: str
    modules: int
    params: int
    per_component: dict[str, int]
    fraction_of_full: float


def strategy_report(model: nn.Module, r: int = 16) -> list[StrategyRow]:
    """LoRA parameters each strategy (vision+language, language-only, vision-only) would train at rank ``r``."""
    model = unwrap_model(model)
    components = resolve_components(model)
    counts: dict[str, tuple[int, int, dict[str, int]]] = {}
    for strategy, flags in STRATEGIES.items():
        config = VisionLoraConfig(r=r, lora_alpha=r, **flags)
        try:
            plan = compile_targets(model, config, components)
        except ValueError:  # the strategy selects nothing here (e.g. no vision tower): it trains 0 parameters
            counts[strategy] = (0, 0, {})
            continue
        per_component: dict[str, int] = {}
        for target in plan.targets:
            per_component[target.component] = per_component.get(target.component, 0) + target.lora_params
        counts[strategy] = (len(plan.targets), sum(per_component.values()), per_component)
    full = counts["vision+language"][1]
    return [
        StrategyRow(name, modules, params, per, params / full if full else math.nan)
        for name, (modules, params, per) in counts.items()
    ]


def _share(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{fraction:.1%}"


def format_strategy_report(rows: list[StrategyRow], model_type: str = "") -> str:
    lines = [f"LoRA parameters per strategy{f' ({model_type})' if model_type else ''}:"]
    lines.append(f"{'strategy':<16} {'modules':>8} {'params':>12} {'of full':>8}  claim")
    for row in rows:
        claim = DESIGN_CLAIMS.get(row.strategy)
        claim_text = f"{claim[0]:.0%}-{claim[1]:.0%}" if claim else ""
        lines.append(
            f"{row.strategy:<16} {row.modules:>8} {row.params:>12,} {_share(row.fraction_of_full):>8}  {claim_text}"
        )
        split = ", ".join(f"{c} {n:,}" for c, n in sorted(row.per_component.items()))
        if split:
            lines.append(f"{'':<16} {split}")
    return "\n".join(lines)


def print_strategy_report(model: nn.Module, r: int = 16) -> list[StrategyRow]:
    rows = strategy_report(model, r=r)
    print(format_strategy_report(rows, getattr(getattr(unwrap_model(model), "config", None), "model_type", "")))
    return rows
