"""Where things are in a VLM: components (towers, projector, language, cross-attention, Q-Former, audio), module
kinds (attention, MLP), and the compilation of component flags into PEFT LoRA targets."""

from .components import ComponentMap, layer_slot, resolve_components, unwrap_model
from .module_kinds import is_candidate_linear, module_kind
from .names import COMPONENT_FLAGS, COMPONENTS, OTHER, check_known_components
from .targets import Target, TargetPlan, TargetRequest, apply_plan, compact_regex, compile_targets

__all__ = [
    "COMPONENTS",
    "COMPONENT_FLAGS",
    "OTHER",
    "ComponentMap",
    "Target",
    "TargetPlan",
    "TargetRequest",
    "apply_plan",
    "check_known_components",
    "compact_regex",
    "compile_targets",
    "is_candidate_linear",
    "layer_slot",
    "module_kind",
    "resolve_components",
    "unwrap_model",
]
