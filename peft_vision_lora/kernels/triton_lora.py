"""Triton LoRA Linear: `y = x W^T + b + s * dropout(x) A^T B^T` in two forward and two backward kernels.

Notation: x (M, K) tokens x in-features, W (N, K) frozen, A (R, K), B (N, R), s = scaling, p = dropout.

Forward
  1. `_lora_shrink_kernel`      t = dropout(x) A^T                      (M, R), dropout drawn in-kernel
  2. `_lora_linear_fwd_kernel`  y = x W^T + b + s * t B^T               (M, N), LoRA added in the matmul epilogue
Backward (dt = s/(1-p) * dy B and dB = s * dy^T t are skinny products left to cuBLAS)
  3. `_lora_linear_dx_kernel`   dx = dy W + (dt A) * mask               (M, K), LoRA added in the matmul epilogue
  4. `_lora_grad_a_kernel`      dA = dt^T (x * mask)                    (R, K), split over M, summed in fp32

The dropout mask is never stored: element e = m * K + k is kept iff lane e % 4 of the 64-bit counter hash of word
e // 4 passes the threshold (`_keep`, the hash of `dropout.dropout_bits`), so backward regenerates exactly the
forward's mask and both backends drop the same elements. The seed is a 0-d int64 device tensor the kernels load:
no host sync, and a CUDA graph replays with whatever seed the graph drew. One hash (2 multiplies, 3 xor-shifts)
per element replaces `tl.rand`'s 64-bit Philox (10 rounds, 1 of 4 outputs used).

Every index that meets a stride is int64 (a 262,144 x 8,192 head has N*K >= 2**31), accumulation is fp32, stores
cast. The LoRA branch runs in the adapters' dtype (fp32 adapters on a bf16 base: fp32 dots), like PEFT's layer.
Every launch runs under `_device_guard(x.device)`: Triton launches on the *current* CUDA device.

Layout follows Liger-Kernel: private `@triton.jit` kernels, host functions that flatten to 2-D, launch and restore
the shape, and a thin `TritonLoraLinearFunction` on top with the signature of `TorchLoraLinearFunction`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .common import apply_lora_function, fused_lora_function
from .dropout import dropout_threshold, seed_tensor
from .torch_fused import lora_linear_torch

# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _keep(seed, offsets, threshold):
    # keep[e] = signed16(lane e % 4 of splitmix64(seed + (e // 4 + 1) * golden)) >= threshold; all mod 2**64
    z = ((offsets >> 2) + 1).to(tl.uint64) * 0x9E3779B97F4A7C15 + seed.to(tl.uint64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    lane = ((z >> ((offsets & 3) * 16).to(tl.uint64)) & 0xFFFF).to(tl.int32)  # unsigned 16-bit lane
    return tl.where(lane >= 32768, lane - 65536, lane) >= threshold  # as int16, the torch path's view


@triton.jit
def _dropout_mask_kernel(mask_ptr, seed_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # mask[m, k] = keep[m * K + k]        (for tests: the mask the other kernels use)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets = rm[:, None] * K + rk[None, :]
    keep = _keep(tl.load(seed_ptr), offsets, threshold)
    bounds = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(mask_ptr + offsets, keep.to(mask_ptr.dtype.element_ty), mask=bounds)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_am, stride_tm,
    threshold, keep_scale,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # t[m, r] = keep_scale * sum_k x[m, k] * keep[m, k] * A[r, k]        keep_scale = 1 / (1 - p), in A's dtype
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x_bounds = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_bounds, other=0.0)  # (BM, BK)
        x = x.to(a_ptr.dtype.element_ty)  # fp32 adapters on a bf16 base: the branch runs in fp32, as in PEFT
        if DROPOUT:
            x = tl.where(_keep(seed, rm[:, None] * K + rk[None, :], threshold), x, 0.0)
        a_bounds = (rk[:, None] < K) & (rr[None, :] < R)
        a = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None], mask=a_bounds, other=0.0)  # A^T tile (BK, BR)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    t_bounds = (rm[:, None] < M) & (rr[None, :] < R)
    tl.store(t_ptr + rm[:, None] * stride_tm + rr[None, :], acc.to(t_ptr.dtype.element_ty), mask=t_bounds)


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    # super-grouped tile order: GROUP row-blocks share column-blocks while they are hot in L2
    grid_rows = tl.cdiv(num_rows, BLOCK_ROWS)
    grid_cols = tl.cdiv(num_cols, BLOCK_COLS)
    width = GROUP * grid_cols
    first_row = (pid // width) * GROUP
    group_rows = tl.minimum(grid_rows - first_row, GROUP)
    pid_row = first_row + (pid % width) % group_rows
    pid_col = (pid % width) // group_rows
    return pid_row, pid_col


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_wn, stride_wk, stride_tm, stride_bn, stride_ym,
    scaling,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + s * sum_r t[m, r] B[n, r]
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )  # (BM, BK)
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
            mask=(rk[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )  # W^T tile (BK, BN); any strides, so a transposed or sliced W is read in place
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    # epilogue: the LoRA expand while the tile is still in registers, so y is written once
    rr = tl.arange(0, BLOCK_R)
    t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    b = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    acc += scaling * tl.dot(t, b, input_precision=LORA_PRECISION)  # (BM, BR) @ B^T tile (BR, BN), adapter dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_bounds = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_bounds)


@triton.jit
def _lora_linear_dx_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr, seed_ptr,
    M, N, K, R,
    stride_dym, stride_wn, stride_wk, stride_dtm, stride_am, stride_dxm,
    threshold,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # dx[m, k] = sum_n dy[m, n] W[n, k] + keep[m, k] * sum_r dt[m, r] A[r, k]       dt = s/(1-p) * dy B
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: rn * stride_wn passes 2**31 once N*K does
        dy = tl.load(
            dy_ptr + rm[:, None] * stride_dym + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0
        )  # (BM, BN)
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
            mask=(rn[:, None] < N) & (rk[None, :] < K),
            other=0.0,
        )  # (BN, BK)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    # epilogue: the LoRA part of dx, masked by the forward's dropout
    rr = tl.arange(0, BLOCK_R)
    dt = tl.load(
        dt_ptr + rm[:, None] * stride_dtm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0
    )  # (BM, BR)
    a = tl.load(
        a_ptr + rr[:, None] * stride_am + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0
    )  # (BR, BK)
    lora = tl.dot(dt, a, input_precision=LORA_PRECISION)  # adapter dtype
    if DROPOUT:
        lora = tl.where(_keep(tl.load(seed_ptr), rm[:, None] * K + rk[None, :], threshold), lora, 0.0)
    acc += lora
    dx_bounds = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=dx_bounds)


@triton.jit
def _lora_grad_a_kernel(
    dt_ptr, x_ptr, partial_ptr, seed_ptr,
    M, K, R, rows_per_split,
    stride_dtm, stride_xm,
    threshold,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # partial[split, r, k] = sum_{m in split} dt[m, r] * x[m, k] * keep[m, k]      dA = sum_split partial
    pid_k = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = split * rows_per_split
    m_stop = tl.minimum(m_start + rows_per_split, M)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        dt_t = tl.load(
            dt_ptr + rm[None, :] * stride_dtm + rr[:, None], mask=(rr[:, None] < R) & (rm[None, :] < m_stop), other=0.0
        )  # dt^T tile (BR, BM)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < m_stop) & (rk[None, :] < K), other=0.0
        ).to(dt_ptr.dtype.element_ty)  # (BM, BK), in the adapters' dtype
        if DROPOUT:
            x = tl.where(_keep(seed, rm[:, None] * K + rk[None, :], threshold), x, 0.0)
        acc = tl.dot(dt_t, x, acc, input_precision=PRECISION)
    bounds = (rr[:, None] < R) & (rk[None, :] < K)
    tl.store(partial_ptr + split * R * K + rr[:, None] * K + rk[None, :], acc, mask=bounds)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------------

# `triton.jit` picks interpreter or compiler when a function is defined, here when this module is imported. The
# kernels run on CPU tensors only if TRITON_INTERPRET=1 was set before that.
INTERPRETED: bool = isinstance(_keep, InterpretedFunction)


def _interpreting() -> bool:
    return INTERPRETED


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots honour torch's TF32 switch so fp32 results match torch's matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device: make it the tensors' device (Liger's `device_context`)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Two configs each: enough to pick a tile for large vs. small problems without long tuning runs. The forward tiles
# y over (M, N) and reduces over K; dx tiles over (M, K) and reduces over N.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
DX_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# Keyed on the weight's shape and the rank's tile (BLOCK_R: a tile tuned at r=16 is not reused at r=128), plus the
# operand dtypes the autotuner adds itself; never on the token count, which changes every batch.
AUTOTUNE_KEY = ["N", "K", "BLOCK_R"]
_fwd_tuned = triton.autotune(FWD_CONFIGS, key=AUTOTUNE_KEY)(_lora_linear_fwd_kernel)
_dx_tuned = triton.autotune(DX_CONFIGS, key=AUTOTUNE_KEY)(_lora_linear_dx_kernel)
# The interpreter runs tiles one after another with numpy ops on whole tiles: 32-wide tiles keep per-op overhead low
# and still give test-sized problems several tiles and masked edges.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
_SKINNY_BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 128}  # shrink / dA kernels on a GPU
_forced: dict[str, triton.Config] = {}  # kernel name -> config, set by `forced_configs`


@contextlib.contextmanager
def forced_configs(fwd: triton.Config | None = None, dx: triton.Config | None = None) -> Iterator[None]:
    """Launch the matmul kernels with these configs instead of autotuning (or the interpreter's small tiles), so
    tests and `benchmarks/gpu_smoke.py` run every GPU tile, 128-wide ones included, even in the interpreter."""
    previous = dict(_forced)
    _forced.update({name: cfg for name, cfg in (("fwd", fwd), ("dx", dx)) if cfg is not None})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def _launch_matmul(name: str, kernel: Any, tuned: Any, grid: Any, args: tuple, meta: dict) -> None:
    """Forced config, else the interpreter's small tiles, else the autotuner; `grid` maps a config dict to a grid."""
    config = _forced.get(name)
    if config is not None:
        options = {} if _interpreting() else {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, **options)
    elif _interpreting():
        kernel[grid(_INTERPRETER_BLOCKS)](*args, **meta, **_INTERPRETER_BLOCKS)
    else:
        tuned[grid](*args, **meta)


def _skinny_blocks() -> dict[str, int]:
    if _interpreting():
        return {"BLOCK_M": 32, "BLOCK_K": 32}
    return dict(_SKINNY_BLOCKS)


def _dropout_args(seed: torch.Tensor | None, p: float, fallback: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(seed pointer, threshold, DROPOUT); without dropout any tensor stands in for the unread seed pointer."""
    if p > 0.0:
        return seed, dropout_threshold(p), True
    return fallback, 0, False


# ----------------------------------------------------------------------------------------------------------------
# host functions: flatten to 2-D, launch, restore
# ----------------------------------------------------------------------------------------------------------------


def _as_rows(tensor: torch.Tensor, features: int) -> torch.Tensor:
    """(..., features) -> (rows, features) with unit stride along features, copying only if needed."""
    rows = tensor.reshape(-1, features)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def check_plain_tensors(**tensors: torch.Tensor | None) -> None:
    """Triton reads raw pointers: a DTensor or other tensor subclass (tensor parallelism applied after injection)
    would hand it one shard's memory as if it were the whole matrix."""
    for name, tensor in tensors.items():
        if tensor is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(
                f"The Triton LoRA kernels need plain tensors, got {name} as {type(tensor).__name__}. Use "
                "kernel='torch' (or 'auto') for sharded or tensor-subclass weights, or apply tensor parallelism "
                "before get_peft_model so that PEFT's own layer wraps those modules."
            )


def triton_dropout_mask(
    seed: torch.Tensor | int,
    shape: tuple[int, ...],
    p: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The 0/1 keep-mask the Triton kernels draw for an input of `shape` (flattened to rows of `shape[-1]`); the
    same bits as `dropout.dropout_mask`, computed by the kernels' `_keep`."""
    device = torch.device(device)
    cols = int(shape[-1])
    rows = 1
    for size in shape[:-1]:
        rows *= int(size)
    mask = torch.empty((rows, cols), dtype=dtype, device=device)
    if mask.numel() == 0:
        return mask.view(tuple(shape))
    blocks = _skinny_blocks()
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(cols, blocks["BLOCK_K"]))
    with _device_guard(device):
        _dropout_mask_kernel[grid](mask, seed_tensor(seed, device), rows, cols, dropout_threshold(p), **blocks)
    return mask.view(tuple(shape))


def lora_shrink_forward(x2d: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """t = dropout(x) A^T: (M, K), (R, K) -> (M, R), in A's dtype."""
    (M, K), R = x2d.shape, lora_A.shape[0]
    lora_A = lora_A.contiguous()  # (R, K): small
    t = torch.empty((M, R), dtype=lora_A.dtype, device=x2d.device)
    seed_ptr, threshold, dropout = _dropout_args(seed, p, t)
    blocks = _skinny_blocks()
    grid = (triton.cdiv(M, blocks["BLOCK_M"]),)
    _lora_shrink_kernel[grid](
        x2d, lora_A, t, seed_ptr, M, K, R, x2d.stride(0), lora_A.stride(0), t.stride(0), threshold, 1.0 / (1.0 - p),
        DROPOUT=dropout, PRECISION=_precision(lora_A.dtype), BLOCK_R=_block_r(R), **blocks,
    )  # fmt: skip
    return t


def lora_expand_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:  # fmt: skip
    """y = x W^T + b + s * t B^T in one matmul kernel: (M, K) -> (M, N). W is read through its strides (no copy)."""
    (M, K), (N, R) = x2d.shape, lora_B.shape
    lora_B = lora_B.contiguous()  # (N, R): small
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    args = (
        x2d, weight, bias if bias is not None else y, t, lora_B, y, M, N, K, R,
        x2d.stride(0), weight.stride(0), weight.stride(1), t.stride(0), lora_B.stride(0), y.stride(0), float(scaling),
    )  # fmt: skip
    meta = {
        "HAS_BIAS": bias is not None, "PRECISION": _precision(x2d.dtype), "LORA_PRECISION": _precision(t.dtype),
        "BLOCK_R": _block_r(R),
    }  # fmt: skip

    def grid(cfg: dict) -> tuple[int]:
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    _launch_matmul("fwd", _lora_linear_fwd_kernel, _fwd_tuned, grid, args, meta)
    return y


def lora_dx_backward(
    dy: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None,
    p: float,
) -> torch.Tensor:  # fmt: skip
    """dx = dy W + (dt A) * mask: (M, N) -> (M, K); `dt` already carries s / (1 - p). W is read through its strides."""
    (M, N), (R, K) = dy.shape, lora_A.shape
    lora_A = lora_A.contiguous()
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    seed_ptr, threshold, dropout = _dropout_args(seed, p, dx)
    args = (
        dy, weight, dt, lora_A, dx, seed_ptr, M, N, K, R,
        dy.stride(0), weight.stride(0), weight.stride(1), dt.stride(0), lora_A.stride(0), dx.stride(0), threshold,
    )  # fmt: skip
    meta = {
        "DROPOUT": dropout, "PRECISION": _precision(dy.dtype), "LORA_PRECISION": _precision(dt.dtype),
        "BLOCK_R": _block_r(R),
    }  # fmt: skip

    def grid(cfg: dict) -> tuple[int]:
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)

    _launch_matmul("dx", _lora_linear_dx_kernel, _dx_tuned, grid, args, meta)
    return dx


def lora_grad_a_backward(
    dt: torch.Tensor, x2d: torch.Tensor, seed: torch.Tensor | None, p: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """dA = dt^T dropout(x) without dropout's scale (already in dt): (M, R), (M, K) -> (R, K), in dt's dtype."""
    (M, R), K = dt.shape, x2d.shape[1]
    blocks = _skinny_blocks()
    k_blocks = triton.cdiv(K, blocks["BLOCK_K"])
    # split M so that ~2 programs per SM run even when K is small; partial sums stay fp32
    # (the interpreter pretends to have 4 SMs so that tests run the split too)
    sm_count = 4 if _interpreting() else torch.cuda.get_device_properties(dt.device).multi_processor_count
    splits = max(1, min(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(2 * sm_count, k_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, R, K), dtype=torch.float32, device=dt.device)
    seed_ptr, threshold, dropout = _dropout_args(seed, p, partial)
    _lora_grad_a_kernel[(k_blocks, splits)](
        dt, x2d, partial, seed_ptr, M, K, R, rows_per_split, dt.stride(0), x2d.stride(0), threshold,
        DROPOUT=dropout, PRECISION=_precision(dt.dtype), BLOCK_R=_block_r(R), **blocks,
    )  # fmt: skip
    return partial.sum(0).to(out_dtype)


def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (y with x's leading shape, x as rows, t) for `y = x W^T + b + s * dropout(x) A^T B^T`."""
    check_plain_tensors(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    with _device_guard(x.device):
        x2d = _as_rows(x, weight.shape[1])  # (M, K)
        t = lora_shrink_forward(x2d, lora_A, seed, dropout_p)  # (M, R), adapter dtype
        y = lora_expand_forward(x2d, weight, bias, t, lora_B, scaling)  # (M, N)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), x2d, t


def lora_linear_backward(
    grad_output: torch.Tensor, x2d: torch.Tensor | None, weight: torch.Tensor | None,
    lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, t: torch.Tensor | None,
    scaling: float, dropout_p: float, seed: torch.Tensor | None, needs: tuple[bool, ...], x_shape: torch.Size,
    lora_dtype: torch.dtype, dx: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """Gradients (dx, dW, db, dA, dB) for what `needs` asks; a frozen W gets no buffer at all. dA, dB and dt are
    computed in the adapters' dtype (`lora_dtype`), like PEFT's layer. `dx(dy, W, dt, A, seed, p)` computes
    `dy W + (dt A) * mask` (default: the fused Triton kernel; the hybrid path passes cuBLAS plus a masked add)."""
    need_x, need_w, need_b, need_a, need_bb = needs
    s, p = scaling, dropout_p
    with _device_guard(grad_output.device):
        dy = _as_rows(grad_output, grad_output.shape[-1])  # (M, N)
        dya = dy if dy.dtype == lora_dtype else dy.to(lora_dtype)  # (M, N) in the adapters' dtype
        grad_x = grad_w = grad_b = grad_a = grad_bb = None
        if need_bb:
            grad_bb = torch.mm(dya.t(), t).mul_(s)  # dB = s * dy^T t: (N, R)
        if need_x or need_a:
            dt = torch.mm(dya, lora_B).mul_(s / (1.0 - p))  # dt = s/(1-p) * dy B: (M, R)
            if need_a:
                grad_a = lora_grad_a_backward(dt, x2d, seed, p, lora_dtype)  # (R, K); lora_A is saved only for dx
            if need_x:
                grad_x = (dx or lora_dx_backward)(dy, weight, dt, lora_A, seed, p).view(x_shape)  # (M, K) -> x's shape
        if need_w:
            grad_w = torch.mm(dy.t(), x2d)  # only for an unfrozen base weight
        if need_b:
            grad_b = dy.sum(0)
    return grad_x, grad_w, grad_b, grad_a, grad_bb


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


TritonLoraLinearFunction = fused_lora_function(
    "TritonLoraLinearFunction",
    lora_linear_forward,
    lora_linear_backward,
    "Same contract as `TorchLoraLinearFunction`; saves x, t = dropout(x) A^T and the seed, never the mask.",
)


def lora_linear_triton(
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
    """Fused LoRA Linear through the Triton kernels; `x` is (..., in). Draws a dropout seed unless one is given."""
    if x.numel() == 0:  # no tokens: nothing to launch
        return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
    return apply_lora_function(
        TritonLoraLinearFunction, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed
    )
