"""What `kernel="auto"` runs on CUDA: a small table keyed by dtype and token count, written by a GPU smoke run.

`benchmarks/gpu_smoke.py` times three paths per dtype and token bucket: torch-fused (cuBLAS GEMMs + `addmm_`), the full
Triton path (`triton_lora.py`: every GEMM in Triton, the LoRA terms in the epilogues) and the hybrid one (`hybrid.py`:
cuBLAS base GEMMs, Triton only for the dropout-fused shrink, the masked dx add and dA), and writes the winner of each
bucket to a JSON file:

    {"device": "NVIDIA H100 80GB HBM3", "rows": [{"dtype": "bfloat16", "max_tokens": 64, "backend": "torch"}, ...]}

Rows are read in order; the first row whose dtype matches and whose `max_tokens` is >= the token count wins
(`max_tokens: null` means no limit). Point `PEFT_VISION_LORA_KERNEL_TABLE` at such a file, or ship one beside this
module as `auto_table.json`. Until a GPU has measured the paths there is no table and auto picks torch-fused: the
path that can never be slower than itself (neither Triton design has been compared with cuBLAS on real hardware).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

TABLE_ENV = "PEFT_VISION_LORA_KERNEL_TABLE"
SHIPPED_TABLE = Path(__file__).with_name("auto_table.json")
DEFAULT_BACKEND = "torch"
BACKENDS = ("torch", "triton", "hybrid")


@functools.cache
def load_table(path: str | None) -> tuple[dict, ...]:
    """The table's rows from `path` (cached per path); an unreadable or malformed file is an error that names it."""
    if path is None:
        return ()
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Cannot read the kernel='auto' table {path} ({error}); regenerate it with "
            f"`python benchmarks/gpu_smoke.py` or unset {TABLE_ENV}."
        ) from error
    for row in rows:
        if row.get("backend") not in BACKENDS or not isinstance(row.get("dtype"), str):
            raise ValueError(f"Bad row {row} in the kernel='auto' table {path}: backend must be one of {BACKENDS}.")
    return tuple(rows)


def table_path() -> str | None:
    path = os.environ.get(TABLE_ENV)
    if path:
        return path
    return str(SHIPPED_TABLE) if SHIPPED_TABLE.exists() else None


def auto_backend(dtype: torch.dtype, tokens: int | None) -> str:
    """The backend auto runs on CUDA for `tokens` rows of `dtype` (None: the layer's default, before any input)."""
    name = str(dtype).removeprefix("torch.")
    for row in load_table(table_path()):
        if row["dtype"] != name:
            continue
        limit = row.get("max_tokens")
        if tokens is None or limit is None or tokens <= limit:
            return row["backend"]
    return DEFAULT_BACKEND
