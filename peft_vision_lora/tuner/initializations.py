"""Data-driven LoRA initialisations (EVA, CorDA, LoRA-GA) on VLMs, through PEFT's own entry points.

PEFT's preprocessing finds its layers with ``check_target_module_exists(config, name)``: on a ``VisionLoraConfig``
that has not met the model yet, ``target_modules`` is still ``"all-linear"`` (or leaf names narrowed by flags) and
matches nothing, so ``preprocess_corda`` / ``preprocess_loraga`` would silently prepare no layer.
:func:`resolve_targets` compiles the flags on the model first (exactly what ``get_peft_model`` would do), after which
PEFT's functions see the same layers that will be adapted::

    config = resolve_targets(model, VisionLoraConfig(init_lora_weights="corda", corda_config=CordaConfig()))
    preprocess_corda(model, config, run_model=lambda: model(**batch))
    model = get_peft_model(model, config)

EVA runs on the ``PeftModel`` (its config is resolved by then). PEFT's default input functions assume every adapted
layer sees the token sequence; a vision tower sees patches, so :func:`initialize_eva_weights` passes
:func:`eva_model_inputs`/:func:`eva_layer_inputs`, which use the token mask where a layer's input has the tokens'
shape and all rows elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import VisionLoraConfigError
from ..resolve.targets import apply_plan, compile_targets

# Inits whose PEFT preprocessing attaches data to the target modules before ``get_peft_model``.
PREPROCESSED_INITS = {"corda": "preprocess_corda", "lora_ga": "preprocess_loraga"}


def resolve_targets(model: nn.Module, config: Any) -> Any:
    """Compile ``config``'s component flags on ``model`` in place (once) and return it.

    Needed before PEFT functions that read ``target_modules`` on the base model (``preprocess_corda``,
    ``preprocess_loraga``, ``get_eva_state_dict`` without a PeftModel); ``get_peft_model`` then injects exactly the
    modules they saw.
    """
    if not config.is_resolved:
        apply_plan(config, compile_targets(model, config))
    return config


def check_preprocessed(config: Any) -> None:
    """Refuse a CorDA/LoRA-GA adapter whose targets were compiled only now: PEFT's preprocessing saw none of them."""
    init = config.init_lora_weights
    if not isinstance(init, str) or init.lower() not in PREPROCESSED_INITS or config.is_resolved:
        return
    step = PREPROCESSED_INITS[init.lower()]
    raise VisionLoraConfigError(
        f"init_lora_weights={init!r} needs `{step}` to run on the layers that will be adapted, but this config's "
        f"targets are not resolved yet, so `{step}` matched no layer. Call "
        f"`config = peft_vision_lora.resolve_targets(model, config)` before `{step}(model, config, ...)`, then "
        "`get_peft_model(model, config)`."
    )


def eva_model_inputs(model_input: dict[str, Any], peft_config: Any) -> torch.Tensor:
    """The token mask EVA keeps (attention mask, minus ignored labels when ``use_label_mask``): ``(batch, seq)``."""
    if not isinstance(model_input, dict) or "input_ids" not in model_input:
        raise TypeError("eva_model_inputs expects each batch to be a dict with `input_ids` (a processor's output).")
    input_ids = model_input["input_ids"]
    mask = model_input.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    eva = peft_config.eva_config
    if eva is not None and eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask


def eva_layer_inputs(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Rows of ``layer_input`` for EVA's SVD: the kept tokens where the input is laid out like the tokens
    ``(batch, seq, features)``, every row otherwise (vision patches, packed Qwen2-VL patches, Q-Former queries)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {layer_name}: EVA needs a tensor input, got {type(x).__name__}.")
    if x.dim() == 3 and x.shape[:2] == model_input.shape:
        return x[model_input]  # (kept tokens, features)
    return x.reshape(-1, x.shape[-1])  # (rows, features)


def initialize_eva_weights(model: nn.Module, dataloader: Iterable | None = None, **kwargs: Any) -> nn.Module:
    """``peft.initialize_lora_eva_weights`` with input functions that work on every component of a VLM.

    Any keyword of PEFT's function may be given and wins over these defaults.
    """
    from peft import initialize_lora_eva_weights

    kwargs.setdefault("prepare_model_inputs_fn", eva_model_inputs)
    kwargs.setdefault("prepare_layer_inputs_fn", eva_layer_inputs)
    initialize_lora_eva_weights(model, dataloader, **kwargs)
    return model
