"""Compile component flags + a resolved model into PEFT LoRA targets.

The output is plain PEFT vocabulary: one anchored regex for ``target_modules``, ``rank_pattern``/``alpha_pattern``
keys that cannot overlap (each is anchored at the start of the full module name and verified to match only its own
component's modules, because PEFT uses the first matching key and ``save_pretrained`` sorts keys), and
``modules_to_save`` for a fully trained projector. Every check runs before any module is touched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..errors import ComponentResolutionError, VisionLoraConfigError
from .components import ComponentMap, is_embedding_path, layer_slot, output_heads, resolve_components, unwrap_model
from .layer_selection import keep_layers_to_transform
from .module_kinds import is_candidate_linear, is_inert_linear, is_router, module_kind
from .names import ATTENTION, COMPONENT_FLAGS, MLP
from .reachability import unreachable_stacks


class TargetRequest(Protocol):
    """What compilation reads from a config, and :func:`apply_plan` writes back: ``VisionLoraConfig`` is one.

    A protocol, not an import, so that resolution sits below the tuner and knows nothing of it.
    """

    r: int
    lora_alpha: int
    target_modules: Any
    requested_target_modules: Any
    exclude_modules: Any
    modules_to_save: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, int]
    finetune_vision_layers: bool
    finetune_language_layers: bool
    finetune_attention_modules: bool
    finetune_mlp_modules: bool
    finetune_projector: bool | str
    finetune_cross_attention: bool
    finetune_qformer: bool
    finetune_audio_layers: bool
    component_layers: dict[str, list[int]]
    layers_to_transform: Any
    layers_pattern: Any

    @property
    def is_resolved(self) -> bool: ...

    def rank_for(self, component: str) -> int: ...

    def alpha_for(self, component: str) -> int: ...

    def selected_components(self) -> set[str]: ...


@dataclass(frozen=True)
class Target:
    """One linear the adapter will wrap, with the reason it was chosen."""

    name: str
    component: str
    kind: str
    r: int
    alpha: int
    in_features: int
    out_features: int

    @property
    def lora_params(self) -> int:
        return self.r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class TargetPlan:
    """Everything the tuner writes into the config, plus the per-module rows ``explain`` prints."""

    targets: tuple[Target, ...]
    target_regex: str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, int]
    modules_to_save: tuple[str, ...]
    components: ComponentMap
    # (module, reason) for linears the flags chose but that cannot reach the output (never adapted)
    skipped: tuple[tuple[str, str], ...] = ()

    def by_component(self) -> dict[str, list[Target]]:
        grouped: dict[str, list[Target]] = defaultdict(list)
        for target in self.targets:
            grouped[target.component].append(target)
        return dict(grouped)


def candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linears that may be adapted, by full name; under an existing LoRA layer, the linear it wraps (its base layer).

    Internals of existing adapter layers (``base_layer``, ``lora_A.*``) and of ``ModulesToSaveWrapper`` are skipped,
    so a second adapter lands on the same modules as the first.
    """
    found: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            skip_prefixes.append(name + ".")
            if isinstance(module, BaseTunerLayer) and is_candidate_linear(module.get_base_layer()):
                found[name] = module.get_base_layer()
            continue
        if is_candidate_linear(module):
            found[name] = module
    return found


def _features(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if hasattr(linear, "in_features"):
        return int(linear.in_features), int(linear.out_features)
    weight = linear.weight  # transformers Conv1D stores (in, out)
    return int(weight.shape[0]), int(weight.shape[1])


def _leaf(name: str) -> str:
    """``a.b.q_proj`` -> ``q_proj`` (a top-level name is its own leaf)."""
    return name.rpartition(".")[2]


def _requested(config: TargetRequest) -> str | list[str] | set[str]:
    requested = config.requested_target_modules if config.is_resolved else config.target_modules
    return "all-linear" if requested is None else requested


def _filter_requested(names: list[str], requested: str | list[str] | set[str]) -> list[str]:
    if isinstance(requested, str):
        if requested.lower() == "all-linear":
            return names
        return [n for n in names if re.fullmatch(requested, n)]
    wanted = set(requested)
    kept = [n for n in names if n in wanted or _leaf(n) in wanted]
    matched = {_leaf(n) for n in kept} | {n for n in kept if n in wanted}
    missing = sorted(wanted - matched)
    if missing:
        leaves = sorted({_leaf(n) for n in names})
        raise VisionLoraConfigError(
            f"target_modules {missing} match no linear layer in this model. Linear leaf names present: {leaves}."
        )
    return kept


def _excluded_by_user(config: TargetRequest, name: str) -> bool:
    """PEFT's ``exclude_modules`` semantics (regex string, or names/suffixes), applied before reporting."""
    excluded = config.exclude_modules
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, name) is not None
    return name in excluded or any(name.endswith(f".{e}") for e in excluded)


def _wanted(config: TargetRequest, component: str, kind: str) -> bool:
    if component == "projector":
        return config.finetune_projector is True
    if not getattr(config, COMPONENT_FLAGS[component]):
        return False
    if kind == ATTENTION:
        return bool(config.finetune_attention_modules)
    if kind == MLP:
        return bool(config.finetune_mlp_modules)
    # Linears in neither an attention nor an MLP block go with "all of this component".
    return bool(config.finetune_attention_modules and config.finetune_mlp_modules)


def _check_components_exist(config: TargetRequest, components: ComponentMap) -> None:
    for component in ("vision", "language"):
        if getattr(config, COMPONENT_FLAGS[component]) and not components[component]:
            raise ComponentResolutionError(
                f"finetune_{component}_layers=True but no {component} tower was found on model_type "
                f"{components.model_type!r} (found: {components.describe()}). Set finetune_{component}_layers=False, "
                "or report the model so it can join the override table."
            )
    if config.finetune_projector and not components["projector"]:
        raise ComponentResolutionError(
            f"finetune_projector={config.finetune_projector!r} but no projector was found on model_type "
            f"{components.model_type!r} (found: {components.describe()}). Set finetune_projector=False."
        )


def _generalise(name: str) -> str:
    """``a.layers.3.mlp.fc1`` -> regex ``a\\.layers\\.\\d+\\.mlp\\.fc1``."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def compact_regex(selected: set[str], universe: list[str]) -> str:
    """Alternation matching exactly ``selected`` among ``universe``: layer indices become ``\\d+`` where that
    over-selects nothing (so layer ranges stay exact), otherwise names are listed verbatim."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(selected):
        groups[_generalise(name)].append(name)
    alternatives = []
    for pattern, names in groups.items():
        compiled = re.compile(pattern)
        if all(n in selected for n in universe if compiled.fullmatch(n)):
            alternatives.append(pattern)
        else:
            alternatives.extend(re.escape(n) for n in names)
    return "^(?:" + "|".join(sorted(alternatives)) + ")$"


def _keep_requested_layers(
    config: TargetRequest, components: ComponentMap, modules: dict[str, nn.Module], targets: list[Target]
) -> list[Target]:
    """Keep, per component in ``config.component_layers``, only targets in the listed layers of each of its stacks.

    Negative indices count from the end of each stack. An index that exists in no stack of the component is an
    error (PEFT's single ``layers_to_transform`` cannot express per-component ranges, hence this).
    """
    kept = []
    for component, wanted in config.component_layers.items():
        own = [t.name for t in targets if t.component == component]
        if not own:  # the component's flag is off: nothing to narrow
            continue
        slots = {name: layer_slot(components, modules, component, name) for name in own}
        lengths = {slot[0]: slot[2] for slot in slots.values() if slot is not None}
        missing = [i for i in wanted if not any(-n <= i < n for n in lengths.values())]
        if missing:
            raise VisionLoraConfigError(
                f"component_layers[{component!r}] asks for layers {missing}, but the selected {component} modules of "
                f"{components.model_type!r} sit in stacks {lengths or 'none (no numbered layers)'} (stack: number of "
                "layers). Use indices inside those ranges (negative ones count from the end)."
            )
        for name, slot in slots.items():
            if slot is not None and (slot[1] in wanted or slot[1] - slot[2] in wanted):
                kept.append(name)
    layered = set(config.component_layers)
    return [t for t in targets if t.component not in layered or t.name in set(kept)]


def compile_targets(model: nn.Module, config: TargetRequest, components: ComponentMap | None = None) -> TargetPlan:
    """Resolve ``config``'s flags on ``model``; raises a clear error (touching nothing) when the result is empty."""
    model = unwrap_model(model)
    components = components or resolve_components(model)
    _check_components_exist(config, components)
    modules = dict(model.named_modules())
    candidates = candidate_linears(model)
    heads = output_heads(model)
    names = []
    for name in candidates:
        if id(modules[name]) in heads:  # the head itself, or the LoRA layer of another adapter over it
            continue
        if is_embedding_path(name) or is_router(modules, name) or is_inert_linear(modules, name):
            continue
        names.append(name)
    names = _filter_requested(names, _requested(config))
    names = [n for n in names if not _excluded_by_user(config, n)]

    targets = []
    for name in names:
        component = components.component_of(name)
        if component is None:
            continue
        kind = "projector" if component == "projector" else module_kind(modules, name)
        if not _wanted(config, component, kind):
            continue
        in_f, out_f = _features(candidates[name])
        targets.append(
            Target(name, component, kind, config.rank_for(component), config.alpha_for(component), in_f, out_f)
        )
    if config.component_layers:
        targets = _keep_requested_layers(config, components, modules, targets)
    targets = keep_layers_to_transform(config, components, modules, targets)
    targets, skipped = _drop_unreachable(model, components, targets)
    if config.finetune_projector is True and not any(t.component == "projector" for t in targets):
        raise VisionLoraConfigError(
            f"finetune_projector=True asks for LoRA on the projector, but the projector of {components.model_type!r} "
            f"({list(components['projector'])}) has no linear layer. Use finetune_projector='full' to train it fully."
        )
    if not targets:
        flags = ", ".join(f"{c}={c in config.selected_components()}" for c in ("vision", "language", "projector"))
        raise VisionLoraConfigError(
            f"no linear layer matched: {flags}, attention={config.finetune_attention_modules}, "
            f"mlp={config.finetune_mlp_modules}, target_modules={_requested(config)!r} on model_type "
            f"{components.model_type!r} ({components.describe()})."
            + (f" {len(skipped)} chosen module(s) were skipped: {skipped[0][1]}." if skipped else "")
        )

    universe = list(modules)
    selected = {t.name for t in targets}
    rank_pattern, alpha_pattern = {}, {}
    for component in sorted({t.component for t in targets}):
        own = {t.name for t in targets if t.component == component}
        if config.rank_for(component) != config.r:
            rank_pattern[compact_regex(own, universe)] = config.rank_for(component)
        if config.alpha_for(component) != config.lora_alpha:
            alpha_pattern[compact_regex(own, universe)] = config.alpha_for(component)
    modules_to_save = components["projector"] if config.finetune_projector == "full" else ()
    return TargetPlan(
        targets=tuple(targets),
        target_regex=compact_regex(selected, universe),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=tuple(modules_to_save),
        components=components,
        skipped=tuple(skipped),
    )


def _drop_unreachable(
    model: nn.Module, components: ComponentMap, targets: list[Target]
) -> tuple[list[Target], list[tuple[str, str]]]:
    """Targets whose output can reach the model's output, and (name, reason) for the others."""
    stacks = unreachable_stacks(model, components)
    kept, skipped = [], []
    for target in targets:
        dead = next((s for s in stacks if s.covers(target.name)), None)
        if dead is None:
            kept.append(target)
        else:
            skipped.append((target.name, dead.reason))
    return kept, skipped


def apply_plan(config: TargetRequest, plan: TargetPlan) -> None:
    """Write the compiled targets back into ``config`` so the saved adapter reloads without re-resolving."""
    if not config.is_resolved:
        requested = config.target_modules
        config.requested_target_modules = sorted(requested) if isinstance(requested, (set, list)) else requested
    config.target_modules = plan.target_regex
    config.rank_pattern = {**(config.rank_pattern or {}), **plan.rank_pattern}
    config.alpha_pattern = {**(config.alpha_pattern or {}), **plan.alpha_pattern}
    if plan.modules_to_save:
        existing = list(config.modules_to_save or [])
        config.modules_to_save = existing + [m for m in plan.modules_to_save if m not in existing]
