"""What both fused LoRA Functions (torch and Triton) share: operand checks, the autocast and seed handling around a
call, and the rule for what forward saves for backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .dropout import new_dropout_seed, seed_tensor


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


def fused_lora_function(
    name: str, host_forward: Callable[..., tuple], host_backward: Callable[..., tuple], doc: str
) -> type[torch.autograd.Function]:
    """A thin autograd Function over a kernel path's host functions (Liger's layering), shared by Triton and hybrid.

    ``host_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed) -> (y, x2d, t)`` and
    ``host_backward(dy, x2d, weight, lora_A, lora_B, t, scaling, p, seed, needs_input_grad, x_shape, lora_dtype)``
    ``-> (dx, dW, db, dA, dB)``. Saved for backward: what :func:`save_lora_context` keeps, never the mask.
    """

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
        seed = seed_tensor(seed, x.device) if dropout_p > 0.0 else None  # an int seed too, when called directly
        y, x2d, t = host_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        save_lora_context(ctx, x, x2d, weight, lora_A, lora_B, t, scaling, dropout_p, seed)
        return y

    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
        with no_autocast(ctx.device_type):
            grads = host_backward(
                grad_output, x2d, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p, seed,
                tuple(ctx.needs_input_grad[:5]), ctx.x_shape, ctx.lora_dtype,
            )  # fmt: skip
        return (*grads, None, None, None)

    namespace = {"__doc__": doc, "__module__": host_forward.__module__}
    namespace |= {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), namespace)
