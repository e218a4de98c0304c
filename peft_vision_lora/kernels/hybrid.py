"""Hybrid LoRA Linear: cuBLAS for the base GEMMs, Triton only for the LoRA-specific work that cuBLAS cannot fuse.

    y = x W^T + b + s * dropout(x) A^T B^T        x (M, K), W (N, K) frozen, A (R, K), B (N, R)

The second GPU design behind `kernel="auto"` (issue 17): the full Triton path (`triton_lora.py`) also runs the two
big GEMMs (x W^T, dy W) in Triton, which must beat cuBLAS to win; this one leaves them to cuBLAS and keeps Triton for
what cuBLAS cannot do without a mask tensor.

Forward
  1. y = x W^T + b                                  cuBLAS (`F.linear`)
  2. t = dropout(x) A^T                             (M, R), `triton_lora._lora_shrink_kernel`, dropout in-kernel
  3. y += s * t B^T                                 cuBLAS `addmm_`, in place
Backward (dt = s/(1-p) * dy B and dB = s * dy^T t are skinny cuBLAS products, as in the full path)
  4. dx = dy W                                      cuBLAS
  5. dx += (dt A) * mask                            `_lora_dx_add_kernel` below, in place; `addmm_` without dropout
  6. dA = dt^T (x * mask)                           `triton_lora._lora_grad_a_kernel`, split over M, fp32 sums

The mask is regenerated from the seed in every kernel (`_keep`, the hash of `dropout.dropout_bits`): nothing of
size (M, K) is stored, and the elements dropped are those of the torch and full Triton paths. Layout follows
Liger-Kernel: one private kernel, host functions, a thin `HybridLoraLinearFunction` with the signature of
`TorchLoraLinearFunction`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_lora
from .common import apply_lora_function, fused_lora_function
from .torch_fused import lora_linear_torch
from .triton_lora import _keep  # a jitted helper must be a global of the kernel's module

# ----------------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_dx_add_kernel(
    dx_ptr, dt_ptr, a_ptr, seed_ptr,
    M, K, R,
    stride_dxm, stride_dtm, stride_am,
    threshold,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dx[m, k] += keep[m, k] * sum_r dt[m, r] A[r, k]        dt = s/(1-p) * dy B, in the adapters' dtype
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    dt = tl.load(
        dt_ptr + rm[:, None] * stride_dtm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0
    )  # (BM, BR)
    a = tl.load(
        a_ptr + rr[:, None] * stride_am + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0
    )  # (BR, BK)
    lora = tl.dot(dt, a, input_precision=PRECISION)  # (BM, BK) fp32; R fits one tile, so no loop
    if DROPOUT:
        lora = tl.where(_keep(tl.load(seed_ptr), rm[:, None] * K + rk[None, :], threshold), lora, 0.0)
    bounds = (rm[:, None] < M) & (rk[None, :] < K)
    offsets = rm[:, None] * stride_dxm + rk[None, :]
    dx = tl.load(dx_ptr + offsets, mask=bounds, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, (dx + lora).to(dx_ptr.dtype.element_ty), mask=bounds)  # one rounding of the sum


# ----------------------------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------------------------


def lora_dx_add_(
    dx: torch.Tensor, dt: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None, p: float
) -> None:
    """dx += (dt A) * mask in place: (M, K) += (M, R) (R, K); `dt` already carries s / (1 - p).

    Without dropout and with one dtype this is cuBLAS's `addmm_`; with dropout (the mask regenerated in-kernel) or
    fp32 adapters on a low-precision base (the LoRA part summed in fp32, one rounding) it is one Triton launch.
    """
    if p == 0.0 and dt.dtype == dx.dtype:
        dx.addmm_(dt, lora_A)
        return
    (M, K), R = dx.shape, lora_A.shape[0]
    lora_A = lora_A.contiguous()  # (R, K): small
    seed_ptr, threshold, dropout = triton_lora._dropout_args(seed, p, dx)
    blocks = triton_lora._skinny_blocks()
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(K, blocks["BLOCK_K"]))
    _lora_dx_add_kernel[grid](
        dx, dt, lora_A, seed_ptr, M, K, R, dx.stride(0), dt.stride(0), lora_A.stride(0), threshold,
        DROPOUT=dropout, PRECISION=triton_lora._precision(dt.dtype), BLOCK_R=triton_lora._block_r(R), **blocks,
    )  # fmt: skip


def hybrid_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (y with x's leading shape, x as rows, t) for `y = x W^T + b + s * dropout(x) A^T B^T`."""
    triton_lora.check_plain_tensors(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    with triton_lora._device_guard(x.device):
        x2d = triton_lora._as_rows(x, weight.shape[1])  # (M, K)
        y = F.linear(x2d, weight, bias)  # (M, N): cuBLAS
        t = triton_lora.lora_shrink_forward(x2d, lora_A, seed, dropout_p)  # (M, R), adapter dtype
        if t.dtype == y.dtype:
            y.addmm_(t, lora_B.t(), alpha=scaling)  # y += s * t B^T in place: no (M, N) temporary
        else:  # fp32 adapters on a low-precision base: PEFT's order (upcast, add in fp32, one rounding back)
            y = torch.addmm(y.to(t.dtype), t, lora_B.t(), alpha=scaling).to(y.dtype)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), x2d, t


def _cublas_dx(
    dy: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None, p: float
) -> torch.Tensor:
    """dx = dy W with cuBLAS, then dx += (dt A) * mask in place: (M, K)."""
    grad_x = dy.mm(weight)
    lora_dx_add_(grad_x, dt, lora_A, seed, p)
    return grad_x


# Gradients (dx, dW, db, dA, dB) for what `needs` asks, as the full Triton path computes them (dA by its kernel, dB
# and dt by cuBLAS, in the adapters' dtype like PEFT) except dx: cuBLAS for dy W plus the masked LoRA add.
hybrid_backward = functools.partial(triton_lora.lora_linear_backward, dx=_cublas_dx)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


HybridLoraLinearFunction = fused_lora_function(
    "HybridLoraLinearFunction",
    hybrid_forward,
    hybrid_backward,
    "Same contract as `TorchLoraLinearFunction`; saves x, t = dropout(x) A^T and the seed, never the mask.",
)


def lora_linear_hybrid(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Fused LoRA Linear with cuBLAS base GEMMs and Triton LoRA kernels; `x` is (..., in). Draws a dropout seed
    unless one is given."""
    if x.numel() == 0:  # no tokens: nothing to launch
        return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
    return apply_lora_function(
        HybridLoraLinearFunction, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed
    )
