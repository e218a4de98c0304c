"""``explain``: which modules an adapter targets, and why (component, kind, rank, parameters, kernel path)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn

from ..resolve.components import resolve_components, unwrap_model
from ..resolve.module_kinds import module_kind, quantized_layer_path
from ..resolve.names import OTHER
from ..resolve.targets import compile_targets
from ..tuner.config import VisionLoraConfig


@dataclass(frozen=True)
class ExplainRow:
    module: str
    component: str
    kind: str
    rank: int
    params: int
    path: str  # which forward the layer runs: "triton", "hybrid", "torch-fused", "peft", "peft-bnb4"/"peft-bnb8"
    # (PEFT's layer over a bitsandbytes base, dequantizing inside the matmul) or "planned" (not injected yet)


def _adapted_rows(model: nn.Module, adapter_name: str) -> list[ExplainRow]:
    base = unwrap_model(model)
    components = resolve_components(base)
    modules = dict(base.named_modules())
    rows = []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        params = sum(p.numel() for p in module.lora_A[adapter_name].parameters())
        params += sum(p.numel() for p in module.lora_B[adapter_name].parameters())
        path = getattr(module, "kernel_path", None)
        path = path() if callable(path) else (path or quantized_layer_path(module) or "peft")
        component = components.component_of(name) or OTHER
        kind = "projector" if component == "projector" else module_kind(modules, name)
        rows.append(ExplainRow(name, component, kind, int(module.r[adapter_name]), int(params), str(path)))
    return rows


def _config_of(model: nn.Module, adapter_name: str) -> VisionLoraConfig | None:
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    return config if isinstance(config, VisionLoraConfig) else None


def explain(
    model: nn.Module, config: VisionLoraConfig | None = None, adapter_name: str = "default", show: bool = True
) -> list[ExplainRow]:
    """Rows (module, component, kind, rank, params, path) for an adapted model, or for ``config`` on a plain model.

    With a ``config``, nothing is modified: the flags are compiled on a dry run. Prints a table unless ``show=False``.
    """
    if config is None:
        rows = _adapted_rows(model, adapter_name)
        if not rows and _config_of(model, adapter_name) is None:
            raise ValueError(
                "explain(model) needs a model adapted with VisionLoraConfig, or pass config=VisionLoraConfig(...) "
                "to see what it would target on this model."
            )
    else:
        plan = compile_targets(model, _fresh_copy(config))
        rows = [ExplainRow(t.name, t.component, t.kind, t.r, t.lora_params, "planned") for t in plan.targets]
    if show:
        print(format_table(rows))
        skipped = skipped_modules(model, config, adapter_name)
        if skipped:
            print(f"{len(skipped)} chosen module(s) not adapted, because they cannot reach the output:")
            print("\n".join(f"  {name}  ({reason})" for name, reason in skipped))
    return rows


def skipped_modules(
    model: nn.Module, config: VisionLoraConfig | None = None, adapter_name: str = "default"
) -> list[tuple[str, str]]:
    """(module, reason) for linears the flags choose but that are never adapted: their output cannot reach the
    model's output (vision layers after ``vision_feature_layer``), so LoRA there would never get a gradient."""
    config = config if config is not None else _config_of(model, adapter_name)
    if config is None:
        return []
    request = _fresh_copy(config)
    if request.is_resolved:  # compile the user's request again, not the regex it became
        request.target_modules, request.requested_target_modules = request.requested_target_modules, None
    return list(compile_targets(model, request).skipped)


def _fresh_copy(config: VisionLoraConfig) -> VisionLoraConfig:
    """A dry run must not mark the user's config as resolved."""
    return copy.deepcopy(config)


def format_table(rows: list[ExplainRow]) -> str:
    headers = ("module", "component", "kind", "rank", "params", "path")
    table = [headers] + [(r.module, r.component, r.kind, str(r.rank), f"{r.params:,}", r.path) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r.params for r in rows)
    lines.append(f"{len(rows)} modules, {total:,} LoRA parameters")
    return "\n".join(lines)
