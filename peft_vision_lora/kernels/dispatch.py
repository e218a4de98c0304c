"""Pick the LoRA Linear backend: `kernel="auto" | "triton" | "torch"`.

Three backends run: "torch" (fused pure torch, any device), "triton" (every GEMM in Triton, `triton_lora.py`) and
"hybrid" (cuBLAS base GEMMs + Triton LoRA-only kernels, `hybrid.py`). "hybrid" is no `kernel=` value: only `auto`
picks it, on CUDA, where the measured table (`auto_table.py`) says it is the fastest for the dtype and token count.

Triton is optional: without it (or without a GPU) everything runs on the pure-torch path, which is also fast on CPU.
The layer resolves once per forward from the input's device, so a model moved between devices keeps working.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch

from .auto_table import auto_backend
from .torch_fused import lora_linear_torch

KERNELS: tuple[str, ...] = ("auto", "triton", "torch")
Backend = Literal["torch", "triton", "hybrid"]


def _triton_importable() -> bool:
    """Whether the optional ``triton`` package imports (``pip install "peft-vision-lora[triton]"``).

    Only triton's own ImportError means "not available": our kernel module is imported where it runs
    (:func:`_triton_kernels`), so a bug in it raises its real error instead of silently falling back to torch.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON_AVAILABLE: bool = _triton_importable()


def _triton_kernels() -> ModuleType:
    from . import triton_lora

    return triton_lora


def _hybrid_kernels() -> ModuleType:
    from . import hybrid

    return hybrid


def check_kernel_name(kernel: str) -> None:
    """The one check of a ``kernel`` value (the config runs it up front, the dispatcher before each choice)."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; supported values are {', '.join(repr(k) for k in KERNELS)}.")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA, or any device under Triton's interpreter."""
    if not TRITON_AVAILABLE:
        return False
    return device.type == "cuda" or _triton_kernels().INTERPRETED


def triton_unusable_reason() -> str | None:
    """Why no Triton kernel can run in this process (no package, or no CUDA and no interpreter); None if one can."""
    if not TRITON_AVAILABLE:
        return "the `triton` package is not importable (`pip install 'peft-vision-lora[triton]'`)"
    if not (torch.cuda.is_available() or _triton_kernels().INTERPRETED):
        return "no CUDA device is available (Triton's CPU interpreter needs TRITON_INTERPRET=1 set before import)"
    return None


def resolve_kernel(
    kernel: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, tokens: int | None = None
) -> Backend:
    """Map a user's `kernel` choice to the backend that runs on `device`; raise if the choice cannot be honoured.

    `auto` on CUDA follows the measured table in `auto_table.py` for (dtype, tokens): "torch", "triton" or "hybrid";
    torch-fused without one.
    """
    check_kernel_name(kernel)
    device = torch.device(device)
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        # the interpreter is for testing the kernels, never a default
        if not (TRITON_AVAILABLE and device.type == "cuda"):
            return "torch"
        return auto_backend(dtype, tokens)
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
    backend = resolve_kernel(kernel, x.device, x.dtype, tokens)
    if backend == "triton":
        return _triton_kernels().lora_linear_triton(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed
        )
    if backend == "hybrid":
        return _hybrid_kernels().lora_linear_hybrid(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed
        )
    return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
