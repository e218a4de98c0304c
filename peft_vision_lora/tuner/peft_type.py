"""``PeftType.VISION_LORA``: the one name PEFT routes on, added to PEFT's ``PeftType`` enum.

PEFT 0.21 has no plugin hook: ``register_peft_method`` refuses any name that is not already a member of its
``PeftType`` enum. ``PeftType`` is a plain ``str`` enum, so we add the one member with ``aenum.extend_enum`` (the
maintained way to extend a stdlib enum); lookup by name and by value, pickling, deep copies and JSON all keep
working, and the serialised value is the string ``"VISION_LORA"``. Kept apart from registration so that the config,
which needs the member, imports nothing else of the tuner.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "VISION_LORA"
METHOD_NAME = "vision_lora"
# The layers are PEFT LoRA layers, so the parameters keep LoRA's prefix and the saved keys are plain LoRA keys.
PREFIX = "lora_"


def ensure_peft_type() -> PeftType:
    """Add ``PeftType.VISION_LORA`` once; later calls return the existing member."""
    if PEFT_TYPE_NAME not in PeftType.__members__:
        extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    return PeftType[PEFT_TYPE_NAME]
