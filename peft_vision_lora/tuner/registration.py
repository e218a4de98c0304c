"""Register the ``VISION_LORA`` tuner with PEFT's own ``register_peft_method``.

Once :mod:`.peft_type` has added the enum member, PEFT's public registration fills its mappings as it does for its
built-in tuners: nothing of the tuner machinery is patched or copied. Registration lives in the importing
interpreter only. A process that loads a saved ``VISION_LORA`` adapter must ``import peft_vision_lora`` first;
without it PEFT fails with ``KeyError: 'VISION_LORA'``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import hotswap, register_peft_method
from peft.utils.peft_types import PeftType

from .config import VisionLoraConfig
from .model import VisionLoraModel
from .peft_type import METHOD_NAME, PREFIX, ensure_peft_type


def _join_lora_only_tables(peft_type: PeftType) -> None:
    """PEFT keys a few features by ``PeftType.LORA`` in lookup tables; our layers are LoRA layers, so join them.

    Hotswapping checks ``CONFIG_KEYS_TO_CHECK[peft_type]`` before swapping LoRA weights in place.
    """
    hotswap.CONFIG_KEYS_TO_CHECK.setdefault(peft_type, list(hotswap.CONFIG_KEYS_TO_CHECK[PeftType.LORA]))


def register_vision_lora() -> None:
    """Register config and tuner classes with PEFT; idempotent (PEFT itself raises on a second call)."""
    peft_type = ensure_peft_type()
    _join_lora_only_tables(peft_type)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is VisionLoraConfig:
        return
    register_peft_method(name=METHOD_NAME, config_cls=VisionLoraConfig, model_cls=VisionLoraModel, prefix=PREFIX)
