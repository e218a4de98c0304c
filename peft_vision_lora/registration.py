"""Make ``VISION_LORA`` a PEFT type and register the tuner with PEFT's own ``register_peft_method``.

PEFT 0.21 has no plugin hook: ``register_peft_method`` refuses any name that is not already a member of its
``PeftType`` enum. ``PeftType`` is a plain ``str`` enum, so we add the one member with ``aenum.extend_enum`` (the
maintained way to extend a stdlib enum); lookup by name and by value, pickling, deep copies and JSON all keep
working, and the serialised value is the string ``"VISION_LORA"``. Nothing of the tuner machinery is patched or
copied: once the member exists, PEFT's public registration fills its mappings as it does for its built-in tuners.

Registration also wraps three ``PeftModel`` methods (``save_pretrained``, ``push_to_hub``,
``create_or_update_model_card``) for models that hold a ``VISION_LORA`` adapter: atomic saves and our model card on
the Hub; see :mod:`peft_vision_lora.peft_model_hooks` for why and how other tuners stay untouched.

Registration lives in the importing interpreter only. A process that loads a saved ``VISION_LORA`` adapter must
``import peft_vision_lora`` first; without it PEFT fails with ``KeyError: 'VISION_LORA'``.
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


def _join_lora_only_tables(peft_type: PeftType) -> None:
    """PEFT keys a few features by ``PeftType.LORA`` in lookup tables; our layers are LoRA layers, so join them.

    Hotswapping checks ``CONFIG_KEYS_TO_CHECK[peft_type]`` before swapping LoRA weights in place.
    """
    from peft.utils import hotswap

    hotswap.CONFIG_KEYS_TO_CHECK.setdefault(peft_type, list(hotswap.CONFIG_KEYS_TO_CHECK[PeftType.LORA]))


def register_vision_lora() -> None:
    """Register config and tuner classes with PEFT; idempotent (PEFT itself raises on a second call)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from . import peft_model_hooks, portable
    from .config import VisionLoraConfig
    from .model import VisionLoraModel

    peft_type = ensure_peft_type()
    _join_lora_only_tables(peft_type)
    peft_model_hooks.install()
    portable.install()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is VisionLoraConfig:
        return
    register_peft_method(name=METHOD_NAME, config_cls=VisionLoraConfig, model_cls=VisionLoraModel, prefix=PREFIX)
