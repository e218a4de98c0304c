"""Pick the LoRA Linear backend: `kernel="auto" | "triton" | "torch"`.

Triton is optional: without it (or without a GPU) everything runs on the pure-torch path, which is also fast on CPU.
The layer resolves once per forward from the input's device, so a model moved between devices keeps working.
"""

from __future__ import annotations

from typing import Literal

import torch

from .auto_table import auto_backend
from .reference import lora_linear_torch

try:  # optional dependency: `pip install "peft-vision-lora[triton]"`
    from . import triton_lora
except ImportError:  # triton missing, or a build that cannot import on this platform
    triton_lora = None  # type: ignore[assignment]

TRITON_AVAILABLE: bool = triton_lora is not None
KERNELS: tuple[str, ...] = ("auto", "triton", "torch")
Backend = Literal["torch", "triton"]


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA, or any device under Triton's interpreter."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or triton_lora.INTERPRETED


def resolve_kernel(
    kernel: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, tokens: int | None = None
) -> Backend:
    """Map a user's `kernel` choice to the backend that runs on `device`; raise if the choice cannot be honoured.

    `auto` on CUDA follows the measured table in `auto_table.py` for (dtype, tokens), and torch-fused without one.
    """
    device = torch.device(device)
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        # the interpreter is for testing the kernels, never a default
        if not (TRITON_AVAILABLE and device.type == "cuda"):
            return "torch"
        return "triton" if auto_backend(dtype, tokens) == "triton" else "torch"
    if kernel == "triton":
        if not TRITON_AVAILABLE:
            raise ValueError(
                "kernel='triton' needs the `triton` package, which is not importable here. Install it with "
                "`pip install 'peft-vision-lora[triton]'`, or use kernel='auto' (falls back to torch) or 'torch'."
            )
        if not triton_runs_on(device):
            raise ValueError(
                f"kernel='triton' runs on CUDA tensors, got a tensor on {device}. Use kernel='auto' or 'torch' "
                "here, or set TRITON_INTERPRET=1 before importing triton (and so before peft) to run the kernels "
                "in Triton's slow CPU interpreter for testing."
            )
        return "triton"
    raise ValueError(f"Unknown kernel {kernel!r}; supported values are {', '.join(repr(k) for k in KERNELS)}.")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    kernel: str = "auto",
    seed: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`y = x W^T + b + s * dropout(x) A^T B^T` on the backend `kernel` resolves to for `x.device`."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if resolve_kernel(kernel, x.device, x.dtype, tokens) == "triton":
        return triton_lora.lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
