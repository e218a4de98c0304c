"""PEFT's ``layers_to_transform`` / ``layers_pattern`` for VLMs: the same layer indices in every component's stacks.

PEFT applies these options only to a list of leaf names and takes the first numbered segment of each module name
as its layer index. ``VisionLoraConfig`` compiles every request (``"all-linear"`` included) into one regex, which
PEFT would match with no layer filter, so the filter is applied here, while compiling, and the regex then names
only the kept layers. The meaning is that of ``component_layers``, for every component at once: an index selects
that layer of each numbered stack (the vision encoder's blocks, the language model's layers, ...; negative indices
count from the end of each stack). ``layers_pattern`` names the module lists that count as stacks (``"layers"``,
``"blocks"``); modules outside every such stack drop out, as in PEFT. The projector has no layers and is kept
whole (``finetune_projector`` asks for it explicitly). ``component_layers`` wins for the components it names.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from torch import nn

from ..errors import VisionLoraConfigError
from .components import ComponentMap, layer_slot
from .names import BLOCK_COMPONENTS

# Components whose modules sit in numbered stacks; the projector is not one of them.
LAYERED_COMPONENTS = BLOCK_COMPONENTS


class _LayerRequest(Protocol):
    """The config fields read here (``targets.py`` imports this module, so no import of its types back)."""

    layers_to_transform: Any
    layers_pattern: Any
    component_layers: dict[str, list[int]]


class _Placed(Protocol):
    name: str
    component: str


T = TypeVar("T", bound=_Placed)


def keep_layers_to_transform(
    config: _LayerRequest, components: ComponentMap, modules: dict[str, nn.Module], targets: list[T]
) -> list[T]:
    """Drop targets outside ``config.layers_to_transform`` (in the stacks named by ``layers_pattern``, if set).

    Raises before anything is touched when an index exists in no stack, or when no stack matches ``layers_pattern``.
    """
    wanted = config.layers_to_transform
    if wanted is None:
        return targets
    pattern = config.layers_pattern
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    filtered = [t for t in targets if t.component in LAYERED_COMPONENTS and t.component not in config.component_layers]
    slots = {}
    for target in filtered:
        slots[target.name] = layer_slot(components, modules, target.component, target.name, patterns)
    stacks = {slot[0]: slot[2] for slot in slots.values() if slot is not None}
    if not stacks:
        where = f"module list named {patterns}" if patterns else "numbered stack of layers"
        raise VisionLoraConfigError(
            f"layers_to_transform={wanted} on {components.model_type!r}: none of the selected modules that it filters "
            f"({len(filtered)}; the projector and components in `component_layers` are not filtered) sits in a "
            f"{where}. "
            "Check `layers_pattern` (e.g. 'layers', 'blocks'), or pick layers per component with "
            "`component_layers={'vision': [...], 'language': [...]}`."
        )
    missing = [i for i in wanted if not any(-n <= i < n for n in stacks.values())]
    if missing:
        raise VisionLoraConfigError(
            f"layers_to_transform asks for layers {missing}, which exist in no stack of {components.model_type!r}: "
            f"{stacks} (stack: number of layers). Use indices inside those ranges (negative ones count from the end), "
            "or `component_layers` for different layers per component."
        )

    def kept(name: str) -> bool:
        slot = slots[name]
        return slot is not None and (slot[1] in wanted or slot[1] - slot[2] in wanted)

    return [t for t in targets if t.name not in slots or kept(t.name)]
