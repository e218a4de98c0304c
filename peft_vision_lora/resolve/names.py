"""The vocabulary every layer of the package shares: component names, module kinds, and which flag opens which
component. One definition each, with the one check for unknown component names."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import VisionLoraConfigError

COMPONENTS: tuple[str, ...] = ("vision", "projector", "language", "cross_attention", "qformer", "audio")
# What lies outside every component (an lm_head in modules_to_save, embeddings, norms between the towers), and the
# kind of a linear inside neither an attention nor an MLP block.
OTHER = "other"
ATTENTION = "attention"
MLP = "mlp"
MODULE_KINDS: tuple[str, ...] = (ATTENTION, MLP, OTHER)

# The VisionLoraConfig flag that turns each component on.
COMPONENT_FLAGS: dict[str, str] = {
    "vision": "finetune_vision_layers",
    "projector": "finetune_projector",
    "language": "finetune_language_layers",
    "cross_attention": "finetune_cross_attention",
    "qformer": "finetune_qformer",
    "audio": "finetune_audio_layers",
}
# Components that are whole towers/blocks, where the attention/MLP flags choose the linears inside.
BLOCK_COMPONENTS: tuple[str, ...] = tuple(c for c in COMPONENTS if c != "projector")


def check_known_components(where: str, names: Iterable[str], *, extra: tuple[str, ...] = ()) -> None:
    """Raise :class:`VisionLoraConfigError` naming the unknown keys of ``where`` and the valid ones."""
    allowed = COMPONENTS + extra
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise VisionLoraConfigError(f"Unknown component(s) {unknown} in `{where}`; components are {allowed}.")
