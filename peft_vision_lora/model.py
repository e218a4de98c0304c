"""``VisionLoraModel``: PEFT's ``LoraModel`` that compiles component flags on the real model before injecting.

Only two things differ from LoRA: ``inject_adapter`` resolves the components and writes the compiled targets into
the adapter's config (every PEFT path goes through it: ``get_peft_model``, ``add_adapter``, ``load_adapter``,
``PeftModel.from_pretrained``), and ``_create_new_module`` offers our kernel-backed Linear before PEFT's own
dispatchers. Layers stay PEFT LoRA layers, so weights keep LoRA's key names.
"""

from __future__ import annotations

import warnings
from typing import Any

from peft.tuners.lora import LoraModel
from torch import nn

from .config import VisionLoraConfig
from .targets import apply_plan, compile_targets


def _vision_dispatcher():
    """Our kernel-backed Linear dispatcher, when the layer module is present."""
    try:
        from .layer import dispatch_vision_lora
    except ImportError:  # pragma: no cover - the layer ships with the package
        return None
    return dispatch_vision_lora


class VisionLoraModel(LoraModel):
    """LoRA tuner for vision-language models; see :class:`~peft_vision_lora.config.VisionLoraConfig`."""

    prefix: str = "lora_"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        if isinstance(config, VisionLoraConfig) and not config.is_resolved and kwargs.get("state_dict") is None:
            apply_plan(config, compile_targets(model, config))
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        # Some VLMs raise from get_input_embeddings (PP-FormulaNet); our targets never include embeddings unless
        # named, so an unknown tie is no reason to refuse the adapter.
        try:
            return super()._get_module_names_tied_with_embedding()
        except (NotImplementedError, AttributeError, ValueError) as error:
            warnings.warn(f"Could not determine weights tied to the input embeddings ({error}); assuming none.")
            return []

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        dispatch = _vision_dispatcher()
        if dispatch is not None:
            new_module = dispatch(target, adapter_name, config=lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
