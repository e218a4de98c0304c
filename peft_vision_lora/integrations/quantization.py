"""QLoRA for VLMs: which parts stay in high precision, and preparing a k-bit base for training.

A VLM's vision tower and projector are small next to its language model (LLaVA-1.5-7B: ~0.3B of ~7B parameters) and
sensitive to quantization: an image becomes a few hundred tokens through them, so an error there reaches every image
token. QLoRA recipes for VLMs therefore quantize the language model only. :func:`vlm_bnb_config` builds that
``BitsAndBytesConfig``; the modules it keeps are found structurally (:func:`~peft_vision_lora.resolve_components` on a
meta-device copy of the model), never from a name table.

Quantized linears stay LoRA targets: ``bitsandbytes`` ``Linear4bit``/``Linear8bitLt`` are ``nn.Linear`` subclasses,
so component resolution and target compilation see the same modules as on the unquantized model. Our kernel-backed
layer only takes plain ``nn.Linear``; PEFT's bnb dispatchers wrap the quantized ones (the base weight is dequantized
inside bitsandbytes' matmul), and :func:`~peft_vision_lora.resolve.module_kinds.quantized_layer_path` names that
path for ``explain`` ("peft-bnb4"). What a quantized model weighs is in :mod:`peft_vision_lora.reports.memory`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig, PretrainedConfig

from ..resolve.components import resolve_components, unwrap_model
from ..resolve.module_kinds import is_bnb_class
from ..resolve.module_kinds import is_quantized_linear as is_quantized_linear  # the one rule; re-exported
from ..resolve.names import check_known_components

# The image path: what other VLM QLoRA recipes keep in 16/32-bit. The Q-Former (BLIP-2) is a projector too.
DEFAULT_HIGH_PRECISION: tuple[str, ...] = ("vision", "projector", "qformer")


def _build_on_meta(config: PretrainedConfig, model_class: type | None) -> nn.Module:
    """The model's module tree with no memory behind it; names match a ``model_class.from_pretrained`` load."""
    model_class = model_class or AutoModelForImageTextToText
    with torch.device("meta"):
        return model_class.from_config(config)


def as_module_tree(model_or_config: nn.Module | PretrainedConfig | str | os.PathLike, model_class: type | None = None):
    """A model (as given), or a meta-device model built from a config, a local directory or a hub id's config."""
    if isinstance(model_or_config, nn.Module):
        return unwrap_model(model_or_config)
    if isinstance(model_or_config, (str, os.PathLike)):
        model_or_config = AutoConfig.from_pretrained(model_or_config)
    if not isinstance(model_or_config, PretrainedConfig):
        raise TypeError(
            f"Expected a model, a transformers config, or a path/hub id to a config; got {type(model_or_config)}."
        )
    return _build_on_meta(model_or_config, model_class)


def high_precision_modules(
    model_or_config: nn.Module | PretrainedConfig | str | os.PathLike,
    keep: Iterable[str] = DEFAULT_HIGH_PRECISION,
    model_class: type | None = None,
) -> list[str]:
    """Module names to leave unquantized: the ``keep`` components, plus transformers' own defaults (output head,
    tied weights), which a non-empty ``llm_int8_skip_modules`` would otherwise replace."""
    keep = tuple(keep)
    check_known_components("keep", keep)
    from transformers.quantizers.base import get_keys_to_not_convert

    model = as_module_tree(model_or_config, model_class)
    components = resolve_components(model)
    names = [path for component in keep for path in components[component]]
    try:
        defaults = get_keys_to_not_convert(model)
    except (AttributeError, NotImplementedError):  # not a transformers model: keep only the components
        defaults = []
    kept = sorted(set(names) | set(defaults))
    # a module inside another kept one is covered by it (Qwen2-VL's visual.merger inside visual)
    return [n for n in kept if not any(n.startswith(other + ".") for other in kept)]


def vlm_bnb_config(
    model_or_config: nn.Module | PretrainedConfig | str | os.PathLike,
    bits: int = 4,
    keep_high_precision: Iterable[str] = DEFAULT_HIGH_PRECISION,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    extra_skip_modules: Iterable[str] = (),
    model_class: type | None = None,
    **bnb_kwargs,
) -> BitsAndBytesConfig:
    """``BitsAndBytesConfig`` quantizing the language model and keeping ``keep_high_precision`` components unquantized.

    ``model_or_config``: a model (meta-device is fine), a config, or a local path / hub id (only its config is read).
    Module names are those of ``model_class`` (default ``AutoModelForImageTextToText``): pass the class you load with.
    ``keep_high_precision=()`` quantizes everything transformers would. On CPU use ``compute_dtype=torch.float32``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (bitsandbytes NF4/FP4 or LLM.int8), got {bits!r}.")
    skip = high_precision_modules(model_or_config, keep_high_precision, model_class) + list(extra_skip_modules)
    skip = sorted(set(skip))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, **bnb_kwargs)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip,
        **bnb_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Training on a k-bit base
# ----------------------------------------------------------------------------------------------------------------


def disable_bnb_cpu_packing(model: nn.Module) -> int:
    """Stop bitsandbytes (0.50 here) repacking 4-bit weights for its AVX512-BF16 CPU inference kernel.

    On an AVX512-BF16 CPU, a ``Linear4bit`` called without grad in eval mode rewrites its weight into a packed layout
    that only the no-grad kernel reads: training after any evaluation then fails (``a view of a leaf Variable ...``),
    and layers with ``in_features`` below the 64-value blocksize fail at once. Weights already packed are unpacked.
    Only CPU runs are affected; call it on a 4-bit model used on CPU (``prepare_vlm_for_kbit_training`` does).
    Returns the number of 4-bit layers seen.
    """
    changed = 0
    for module in model.modules():
        if not is_bnb_class(module, "Linear4bit"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
        changed += 1
    return changed


def prepare_vlm_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training`` for a VLM: freeze the base, upcast non-quantized fp16/bf16
    weights to fp32, enable gradient checkpointing with input grads; then make CPU k-bit training work.

    Input grads: transformers 5.x hooks the input embeddings of every sub-model, the vision tower's patch
    embedding included, so vision-LoRA gradients survive reentrant checkpointing (``tests/test_qlora.py`` checks it).
    Call it before ``get_peft_model``, as with PEFT.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=use_gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
    disable_bnb_cpu_packing(model)
    return model
