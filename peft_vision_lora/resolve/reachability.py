"""Which vision-tower layers can reach the model's output, read from the model's config.

LLaVA-style models feed the projector ``hidden_states[vision_feature_layer]`` of the vision tower (``-2`` by
default), so the tower's layers after that point run but never influence the loss: LoRA weights there never get a
gradient, yet cost memory and optimizer state and force DDP's ``find_unused_parameters``. ``hidden_states`` holds the
embeddings then one entry per layer, so index ``k`` (``k + n + 1`` when negative, ``n`` layers) is the output of
layer ``k - 1``: layers ``k`` and later are unreachable. A list of feature layers keeps everything up to the deepest.

Models whose towers use every layer are left alone: Qwen3-VL's deepstack taps intermediate blocks but also merges
the last one, and Mllama concatenates intermediate local layers with the final output that feeds its global
encoder. Text-only batches are another matter (the vision tower does not run at all); this module is about
batches with images.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .components import ComponentMap

# Config fields holding the tower hidden-state index (or indices) the projector reads.
FEATURE_LAYER_FIELDS = ("vision_feature_layer", "vision_feature_layers")


@dataclass(frozen=True)
class UnreachableStack:
    """Layers ``start`` and later of ``stack`` (``length`` layers) cannot reach the output, for ``reason``."""

    stack: str
    start: int
    length: int
    reason: str

    def covers(self, name: str) -> bool:
        prefix = self.stack + "."
        if not name.startswith(prefix):
            return False
        index = name[len(prefix) :].split(".", 1)[0]
        return index.isdigit() and int(index) >= self.start


def _feature_layers(config: object) -> tuple[str, list[int]] | None:
    for field in FEATURE_LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return field, [value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            return field, list(value)
    return None


def _layer_stacks(tower: nn.Module, root: str) -> list[tuple[str, int]]:
    """The outermost numbered module lists of a tower (its encoder layers), as (full name, length)."""
    stacks: list[tuple[str, int]] = []
    for name, module in tower.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(s + ".") for s, _ in stacks):
            continue
        stacks.append((f"{root}.{name}", len(module)))
    return stacks


def unreachable_stacks(model: nn.Module, components: ComponentMap) -> list[UnreachableStack]:
    """Vision-tower layer ranges whose output never reaches the model's output (empty for most models)."""
    found = _feature_layers(getattr(model, "config", None))
    if found is None:
        return []
    field, indices = found
    modules = dict(model.named_modules())
    result = []
    for root in components["vision"]:
        stacks = _layer_stacks(modules[root], root)
        if len(stacks) != 1:  # hidden_states index one stack of layers; anything else is not this pattern
            continue
        stack, length = stacks[0]
        deepest = max(i if i >= 0 else i + length + 1 for i in indices)
        if 0 <= deepest < length:
            layers = f"layer {deepest}" if deepest == length - 1 else f"layers {deepest}-{length - 1}"
            reason = (
                f"{field}={indices if len(indices) > 1 else indices[0]}: the projector reads hidden state {deepest} "
                f"of 0-{length}, so the output never depends on {layers} of this tower"
            )
            result.append(UnreachableStack(stack, deepest, length, reason))
    return result
