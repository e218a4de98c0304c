"""Pure-torch LoRA Linear: the numbers every other path must match.

    y = x W^T + b + s * dropout(x) A^T B^T        W (out, in) frozen, A (r, in), B (out, r)

Two implementations live side by side:

* `lora_linear_naive`: the textbook composition (what PEFT's `Linear.forward` runs), differentiated by autograd.
  Tests compare everything else against it.
* `TorchLoraLinearFunction` / `lora_linear_torch`: a hand-written forward and backward that adds the LoRA term into
  the base output in place (`y.addmm_`), keeps no `(tokens, out)` temporaries, computes `dx`, `dA`, `dB` directly, and
  stores no dropout mask: the mask is regenerated from a seed in backward. Measured on 2 CPU cores (fp32, 2048
  tokens, 1024 -> 1024, r=16, forward+backward, `benchmarks/lora_linear.py`): 1.11x a frozen Linear where PEFT's
  layer costs 1.22x; with dropout 0.1, 1.22-1.29x where PEFT's costs 1.5-1.6x. Peak memory: that of the frozen
  Linear without dropout (16.4 vs. 32.1 MB for PEFT), 32.4 vs. 40.1 MB with dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# Dropout keeps an element when a signed 16-bit lane of a counter hash is >= this offset from -2**15, so `p` is
# applied at a resolution of 2**-16 (p=0.1 keeps 0.89999 of the elements instead of 0.9). One 64-bit hash yields four
# lanes. The hash is SplitMix64's output function on the counter `seed + (word + 1) * golden`: stateless, so any
# kernel can regenerate any element's bit from (seed, element index), and the seed can stay a device tensor (no host
# sync, nothing for a CUDA graph to freeze, nothing for torch.compile to break on). The Triton kernels (`_keep` in
# triton_lora.py) compute the same bits, so both backends drop the same elements.
_DROPOUT_LEVELS = 1 << 16


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _xorshift_(z: torch.Tensor, shift: int) -> torch.Tensor:
    # z ^= z >>> shift (logical shift: torch's >> on int64 is arithmetic, so mask off the copied sign bits)
    return z.bitwise_xor_(z.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))


def dropout_bits(seed: torch.Tensor | int, words: int, device: torch.device | str) -> torch.Tensor:
    """(words,) int64 hashes; word w is SplitMix64(seed + (w + 1) * golden), all arithmetic wrapping mod 2**64."""
    z = torch.arange(1, words + 1, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(seed)
    _xorshift_(z, 30).mul_(_MIX1)
    _xorshift_(z, 27).mul_(_MIX2)
    return _xorshift_(z, 31)


def dropout_threshold(p: float) -> int:
    """Keep an element iff its signed 16-bit lane is >= this: P(drop) = round(p * 2**16) / 2**16 ~= p."""
    return round(p * _DROPOUT_LEVELS) - _DROPOUT_LEVELS // 2


def new_dropout_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A 0-d int64 seed drawn on `device` from torch's generator there: no `.item()`, so no host sync, and a CUDA
    graph replay or a compiled graph draws a fresh one each step. `torch.manual_seed` makes it reproducible."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def seed_tensor(seed: torch.Tensor | int, device: torch.device | str) -> torch.Tensor:
    """A user's int seed (tests, reproductions) as the 0-d int64 device tensor the kernels read."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(())
    return torch.tensor(_int64(int(seed) % (1 << 64)), dtype=torch.int64, device=device)


def dropout_mask(
    seed: torch.Tensor | int,
    shape: Sequence[int],
    p: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """0/1 keep-mask for `dropout(x)` with `x.shape == shape`, regenerated identically from `seed`.

    Element e of the flattened shape uses 16-bit lane e % 4 of hash word e // 4. Float, not bool: on CPU
    `x * bool_mask` takes a slow type-promotion path (~20x a float multiply). Each signed lane becomes 0/1 with one
    subtract and one clamp.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}.")
    numel = 1
    for size in shape:
        numel *= int(size)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device)
    # (ceil(numel / 4),) int64 hashes -> (numel,) int16 lanes, lane j of a word = bits 16j..16j+15 (little-endian)
    lanes = dropout_bits(seed, (numel + 3) // 4, device).view(torch.int16)[:numel].view(tuple(shape))
    threshold = dropout_threshold(p)
    # lane - (threshold - 1) is >= 1 exactly when kept and <= 0 otherwise; clamp to {0, 1} (exact in fp32)
    mask = lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0)
    return mask if dtype == torch.float32 else mask.to(dtype)


def lora_linear_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook LoRA Linear through autograd; with `mask` given, dropout uses it instead of drawing its own."""
    result = F.linear(x, weight, bias)
    if training and dropout_p > 0.0:
        if mask is None:
            dropped = F.dropout(x, dropout_p, training=True)
        else:
            dropped = x * mask.view(x.shape) / (1.0 - dropout_p)
    else:
        dropped = x
    return result + F.linear(F.linear(dropped, lora_A), lora_B) * scaling


def save_lora_context(
    ctx: Any,
    x: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    t: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> None:
    """Save for backward only what the requested gradients read (both fused Functions share this rule).

    dx reads W, A and B; dA reads x and B; dB reads t; dW reads x. The dropout mask is never saved: backward
    regenerates it from the 0-d ``seed`` tensor (8 bytes).
    """
    need_x, need_w, _, need_a, need_bb = ctx.needs_input_grad[:5]
    ctx.save_for_backward(
        x2d if (need_w or need_a) else None,
        weight if need_x else None,
        lora_A if need_x else None,
        lora_B if (need_x or need_a) else None,
        t if need_bb else None,
        seed if dropout_p > 0.0 else None,
    )
    ctx.x_shape, ctx.scaling, ctx.dropout_p = x.shape, scaling, dropout_p
    ctx.x_dtype, ctx.lora_dtype, ctx.device_type = x.dtype, lora_A.dtype, x.device.type


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Backward runs in the dtypes forward chose: autocast (if the caller's backward is inside it) stays off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class TorchLoraLinearFunction(torch.autograd.Function):
    """`y = x W^T + b + s * dropout(x) A^T B^T` with a hand-written backward.

    Saves `x`, the `(N, r)` product `t = dropout(x) A^T` and the dropout seed; no mask and no `(N, out)` temporary.
    `seed` (a 0-d int64 tensor) is ignored unless `dropout_p > 0`. `weight`/`bias` are normally frozen; if they do
    require grad they get plain `dW = dy^T x`, `db = sum(dy)`. The LoRA branch runs in the adapters' dtype, as PEFT's
    layer does: fp32 adapters on a bf16 base compute `t`, the expand, dA, dB and dt in fp32 (then one rounding of
    `y` to bf16), at the cost of an fp32 `(N, out)` temporary in that mixed case only.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: torch.Tensor | int | None,
    ) -> torch.Tensor:
        out_features, in_features = weight.shape
        seed = seed_tensor(seed, x.device) if dropout_p > 0.0 else None  # an int seed too, when called directly
        x2d = x.reshape(-1, in_features)  # (N, in)
        y = F.linear(x2d, weight, bias)  # (N, out)
        xa = x2d if lora_A.dtype == x2d.dtype else x2d.to(lora_A.dtype)  # (N, in) in the adapters' dtype
        if dropout_p > 0.0:
            dropped = dropout_mask(seed, xa.shape, dropout_p, xa.device, xa.dtype).mul_(xa)  # (N, in): x * mask
            t = dropped.mm(lora_A.t())  # (N, r)
            del dropped
            t.mul_(1.0 / (1.0 - dropout_p))  # t = dropout(x) A^T: the 1/(1-p) goes on the small side
        else:
            t = xa.mm(lora_A.t())  # (N, r)
        if t.dtype == y.dtype:
            y.addmm_(t, lora_B.t(), alpha=scaling)  # y += s * t B^T in place: no (N, out) temporary
        else:  # PEFT's order: base output upcast, LoRA added in the adapters' dtype, one rounding back
            y = torch.addmm(y.to(t.dtype), t, lora_B.t(), alpha=scaling).to(y.dtype)

        save_lora_context(ctx, x, x2d, weight, lora_A, lora_B, t, scaling, dropout_p, seed)
        ctx.in_features = in_features
        # y itself for 2-D x (what lora_linear_torch passes): a Function's view output can't be modified in place
        return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with no_autocast(ctx.device_type):
            return (*_torch_backward(ctx, grad_output), None, None, None)


def _torch_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x2d, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    s, p, lora_dtype = ctx.scaling, ctx.dropout_p, ctx.lora_dtype
    dy = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
    dya = dy if lora_dtype == dy.dtype else dy.to(lora_dtype)  # (N, out) in the adapters' dtype
    grad_x = grad_w = grad_b = grad_a = grad_bb = None

    if need_bb:
        grad_bb = t.t().mm(dya).t()  # dB = s * dy^T t: (out, r); the r-major product is ~1.5x faster on CPU
        grad_bb.mul_(s)
    if need_x or need_a:
        dt = dya.mm(lora_B)  # (N, r)
        dt.mul_(s / (1.0 - p))  # dt = s * dy B, with dropout's 1/(1-p) folded in (p = 0 without dropout)
        # the forward's keep-mask, regenerated from the seed: (N, in)
        mask = dropout_mask(seed, (dy.shape[0], ctx.in_features), p, dy.device, lora_dtype) if p > 0.0 else None
        dropped = None
        if need_a:
            # dA = dt^T dropout(x): (r, in)
            xa = x2d if lora_dtype == x2d.dtype else x2d.to(lora_dtype)
            dropped = xa * mask if mask is not None else xa
            grad_a = dt.t().mm(dropped)
        if need_x:
            grad_x = dy.mm(weight)  # dx = dy W: (N, in)
            if lora_dtype != grad_x.dtype:  # PEFT's rounding: the LoRA part cast to x's dtype, then added
                lora_dx = dt.mm(lora_A)
                grad_x.add_((lora_dx.mul_(mask) if mask is not None else lora_dx).to(grad_x.dtype))
            elif mask is not None:
                # reuse dA's (N, in) buffer when there is one
                lora_dx = torch.mm(dt, lora_A, out=dropped) if dropped is not None else dt.mm(lora_A)
                grad_x.addcmul_(lora_dx, mask)  # dx += (dt A) * mask
            else:
                grad_x.addmm_(dt, lora_A)  # dx += dt A
            grad_x = grad_x.view(ctx.x_shape)
    if need_w:
        grad_w = dy.t().mm(x2d)  # only for an unfrozen base weight: dW = dy^T x
    if need_b:
        grad_b = dy.sum(0)
    return grad_x, grad_w, grad_b, grad_a, grad_bb


def apply_lora_function(
    function: type[torch.autograd.Function],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    seed: torch.Tensor | int | None,
) -> torch.Tensor:
    """Validate, draw a dropout seed if needed, and run a fused LoRA ``function`` on ``x`` of shape (..., in).

    Under autocast every operand is cast to the autocast dtype first (autograd-tracked, as autocast's own casts are)
    and the Function runs with autocast off, so the torch and Triton backends compute in the same dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias, lora_A, lora_B = (
            t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias, lora_A, lora_B)
        )
        with torch.autocast(device_type, enabled=False):
            return apply_lora_function(function, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed)
    check_operands(x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}.")
    if p == 0.0:
        seed = None  # no dropout, no seed: the Function never reads it
    else:
        seed = new_dropout_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    # Reshape outside the Function: a view returned from a custom Function cannot be modified in place later
    # (Llama 4's MoE does `out.add_(...)` on a projection's output); a view made here is ordinary autograd.
    x2d = x.reshape(-1, x.shape[-1])  # (N, in)
    y = function.apply(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed)  # (N, out)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """Fused LoRA Linear on any device; `x` is (..., in). Draws a dropout seed unless one is given."""
    return apply_lora_function(
        TorchLoraLinearFunction, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed
    )


def check_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> None:
    """Say which operand is wrong instead of failing inside a matmul or, on a GPU, reading another device's memory.

    One device for all; x, weight and bias in one dtype; lora_A and lora_B in one dtype, either x's or float32 (the
    LoRA branch then runs in float32, as PEFT's layer runs it in the adapters' dtype).
    """
    operands = {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, tensor in operands.items():
        if tensor is not None and tensor.device != x.device:
            raise ValueError(
                f"LoRA Linear expects all operands on one device, got x on {x.device} but {name} on "
                f"{tensor.device}; move the module and its inputs to one device (`model.to(x.device)`)."
            )
    for name in ("weight", "bias"):
        tensor = operands[name]
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(
                f"LoRA Linear expects x and the base layer in one dtype, got x {x.dtype} but {name} {tensor.dtype}; "
                "cast them (VisionLoraLinear does this for you)."
            )
    if lora_B.dtype != lora_A.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"LoRA Linear expects lora_A and lora_B in x's dtype ({x.dtype}) or both in float32, got lora_A "
            f"{lora_A.dtype} and lora_B {lora_B.dtype}; cast the adapter weights (VisionLoraLinear does this for you)."
        )
