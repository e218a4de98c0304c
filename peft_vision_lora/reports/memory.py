"""What a VLM's weights weigh once quantized, per component (meta-device models work: only shapes are read)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PretrainedConfig

from ..integrations.quantization import as_module_tree
from ..resolve.components import resolve_components
from ..resolve.names import OTHER

BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize; transformers does not expose it
_NESTED_BLOCKSIZE = 256  # double quantization groups 256 absmax values per fp32 scale


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
        component = components.component_of(owner) or OTHER
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
