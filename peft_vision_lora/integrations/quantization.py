"""QLoRA for VLMs: which parts stay in high precision, preparing a k-bit base for training, and what it weighs.

A VLM's vision tower and projector are small next to its language model (LLaVA-1.5-7B: ~0.3B of ~7B parameters) and
sensitive to quantization: an image becomes a few hundred tokens through them, so an error there reaches every image
token. QLoRA recipes for VLMs therefore quantize the language model only. :func:`vlm_bnb_config` builds that
``BitsAndBytesConfig``; the modules it keeps are found structurally (:func:`~peft_vision_lora.resolve_components` on a
meta-device copy of the model), never from a name table.

Quantized linears stay LoRA targets: ``bitsandbytes`` ``Linear4bit``/``Linear8bitLt`` are ``nn.Linear`` subclasses,
so component resolution and target compilation see the same modules as on the unquantized model. Our kernel-backed
layer only takes plain ``nn.Linear``; PEFT's bnb dispatchers wrap the quantized ones (the base weight is dequantized
inside bitsandbytes' matmul), and :func:`quantized_layer_path` names that path for ``explain`` ("peft-bnb4").
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig, PretrainedConfig

from .components import is_bnb_class, resolve_components, unwrap_model
from .components import is_quantized_linear as is_quantized_linear  # the one rule lives in components; re-exported
from .config import COMPONENTS

# The image path: what other VLM QLoRA recipes keep in 16/32-bit. The Q-Former (BLIP-2) is a projector too.
DEFAULT_HIGH_PRECISION: tuple[str, ...] = ("vision", "projector", "qformer")
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize; transformers does not expose it
_NESTED_BLOCKSIZE = 256  # double quantization groups 256 absmax values per fp32 scale


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
    unknown = sorted(set(keep) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"Unknown component(s) {unknown} in `keep`; components are {COMPONENTS}.")
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


def quantized_layer_path(module: nn.Module) -> str | None:
    """Forward path of a PEFT LoRA layer over a quantized base, for ``explain``: "peft-bnb4", "peft-bnb8",
    "peft-hqq", ...; None for a layer over an unquantized base."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if is_bnb_class(base, "Linear4bit"):
        return "peft-bnb4"
    if is_bnb_class(base, "Linear8bitLt"):
        return "peft-bnb8"
    backend = type(module).__module__.rsplit(".", 1)[-1]
    if type(module).__module__.startswith("peft.tuners.lora.") and backend not in ("layer", "model"):
        return f"peft-{backend}"  # PEFT's hqq/gptq/awq/torchao/eetq LoRA layers
    return None


def warn_if_merging_into_quantized(model: nn.Module) -> None:
    """PEFT merges into a bnb base by dequantizing, adding the LoRA delta and re-quantizing. Say what that loses."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            path = quantized_layer_path(module)
            if path is not None:
                kinds[path] = kinds.get(path, 0) + 1
    if not kinds:
        return
    counts = ", ".join(f"{n} {path.removeprefix('peft-')} layers" for path, n in sorted(kinds.items()))
    warnings.warn(
        f"Merging LoRA into a quantized base ({counts}): each merged weight is dequantized, the LoRA update added "
        "and the sum re-quantized, so the update is rounded to 4/8-bit precision and mostly lost when it is small "
        "next to the quantization step; the merged model's outputs differ from the unmerged adapter's, and "
        "unmerging does not restore the original base exactly. To keep the adapter exact, keep it unmerged, or "
        "load the base unquantized (bf16/fp16), attach the saved adapter with PeftModel.from_pretrained and "
        "merge_and_unload there.",
        UserWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------------------
# Memory arithmetic (meta-device models work: only shapes are read)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """Weight memory of one component after quantization (parameters only: no activations, no optimizer)."""

    component: str
    params: int
    quantized_params: int
    bytes: int
    unquantized_bytes: int


def _bnb4_bytes(numel: int, double_quant: bool) -> int:
    """Packed NF4/FP4 weight plus its quantization state, as bitsandbytes stores it."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    total = math.ceil(numel / 2) + 16 * 4  # two values per byte; the 16-entry fp32 code book
    if double_quant:  # uint8 absmax, re-quantized in groups of 256 with an fp32 scale, a 256-entry code and an offset
        total += blocks + math.ceil(blocks / _NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4
    else:
        total += blocks * 4  # one fp32 absmax per block
    return total


def quantized_footprint(
    model_or_config: nn.Module | PretrainedConfig | str | os.PathLike,
    bnb_config: BitsAndBytesConfig,
    dtype: torch.dtype = torch.bfloat16,
    model_class: type | None = None,
) -> dict[str, Footprint]:
    """Bytes of weights per component once loaded with ``bnb_config`` (non-quantized weights in ``dtype``).

    Which linears get quantized is decided by transformers' own rules (``should_convert_module`` over the skip list
    plus the model's ``_keep_in_fp32_modules``), on a meta-device model, so a 70B model costs nothing to measure.
    Keys: each component found, "other" (embeddings, heads, norms outside the towers) and "total".
    """
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = as_module_tree(model_or_config, model_class)
    components = resolve_components(model)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    skip = HfQuantizer.get_modules_to_not_convert(model, bnb_config.llm_int8_skip_modules, keep_fp32)
    bits = 8 if bnb_config.load_in_8bit else 4 if bnb_config.load_in_4bit else None
    if bits is None:
        raise ValueError("bnb_config quantizes nothing: set load_in_4bit=True or load_in_8bit=True.")
    element = torch.empty((), dtype=dtype).element_size()

    quantized: dict[str, int] = {}  # weight name -> output rows (int8 keeps one fp32 scale per row)
    for name, module in model.named_modules():  # the modules transformers' replace_with_bnb_linear converts
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            quantized[name + ".weight"] = module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features
    rows: dict[str, list[int]] = {}  # component -> [params, quantized_params, bytes, unquantized_bytes]
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        component = components.component_of(owner) or "other"
        row = rows.setdefault(component, [0, 0, 0, 0])
        numel = param.numel()
        row[0] += numel
        row[3] += numel * element
        if name in quantized:
            row[1] += numel
            if bits == 4:
                row[2] += _bnb4_bytes(numel, bnb_config.bnb_4bit_use_double_quant)
            else:
                row[2] += numel + quantized[name] * 4  # int8 weight + one fp32 scale per output row
        else:
            row[2] += numel * element
    result = {c: Footprint(c, *row) for c, row in rows.items()}
    totals = [sum(f[i] for f in rows.values()) for i in range(4)]
    result["total"] = Footprint("total", *totals)
    return result


def format_footprint(footprint: dict[str, Footprint]) -> str:
    lines = [f"{'component':<16} {'params':>14} {'quantized':>14} {'GiB':>8} {'GiB unquantized':>16}"]
    for row in footprint.values():
        lines.append(
            f"{row.component:<16} {row.params:>14,} {row.quantized_params:>14,} {row.bytes / 2**30:>8.2f} "
            f"{row.unquantized_bytes / 2**30:>16.2f}"
        )
    return "\n".join(lines)
