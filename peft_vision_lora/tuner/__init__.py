"""The PEFT tuner: config (data), peft type and registration, the tuner model (a ``LoraModel``), its Linear layer,
and the strict load hook PEFT calls."""

from .config import TASK_PRESETS, VisionLoraConfig
from .layer import VisionLoraLinear, dispatch_vision_lora
from .model import VisionLoraModel
from .peft_type import PEFT_TYPE_NAME, ensure_peft_type
from .registration import register_vision_lora

__all__ = [
    "PEFT_TYPE_NAME",
    "TASK_PRESETS",
    "VisionLoraConfig",
    "VisionLoraLinear",
    "VisionLoraModel",
    "dispatch_vision_lora",
    "ensure_peft_type",
    "register_vision_lora",
]
