"""`VisionLoraLinear`: PEFT's LoRA `Linear` whose plain-LoRA forward runs the fused kernels.

Everything PEFT's layer does (adapter names `lora_A.<adapter>.weight`, several adapters, `set_adapter`,
`disable_adapters`, merge/unmerge, DoRA and other variants, mixed-adapter batches) is inherited unchanged. Only the
common training case, one plain LoRA adapter on an `nn.Linear`, takes the fused path; everything else falls back to
`peft.tuners.lora.layer.Linear.forward`, so the fallback is also the reference. `kernel_path` says which path a layer
takes and `fallback_reason` why, for `explain` reports.

Dtypes: the fused path needs `x` in the base weight's dtype (as `nn.Linear` does) and, like PEFT, runs the LoRA branch
and its gradients in the adapters' dtype: fp32 adapters on a bf16 base (PEFT's default upcast) compute `t`, the
expand, dA and dB in fp32. Adapters in any other dtype are cast to x's. Under autocast every operand is cast to the
autocast dtype first (`apply_lora_function`), as autocast would cast PEFT's matmuls.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..kernels.dispatch import TRITON_AVAILABLE, check_kernel_name, lora_linear, resolve_kernel
from .mixed_batch import mixed_lora_forward, per_token_names

KERNEL_PATHS = ("triton", "torch-fused", "peft", "triton-unavailable")  # values of `kernel_path`


class VisionLoraLinear(LoraLinear):
    """LoRA Linear with a fused forward/backward (`kernel` from the adapter's config: auto, triton or torch)."""

    # per-adapter kernel choice; listed here so PEFT's delete_adapter/bookkeeping treat it like `r` or `scaling`
    other_param_names = LoraLinear.other_param_names + ("lora_kernel",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: int = 1,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        self.lora_kernel: dict[str, str] = {}  # filled by update_layer, which PEFT's __init__ calls
        super().__init__(
            base_layer,
            adapter_name,
            config=config,
            r=r,
            lora_alpha=lora_alpha,
            is_target_conv_1d_layer=is_target_conv_1d_layer,
            **kwargs,
        )

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        kernel = getattr(config, "kernel", "auto")  # a plain LoraConfig has no `kernel`: auto
        check_kernel_name(kernel)
        if kernel == "triton" and not TRITON_AVAILABLE:
            raise ValueError(
                "kernel='triton' needs the `triton` package: `pip install 'peft-vision-lora[triton]'`, "
                "or use kernel='auto'."
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.lora_kernel[adapter_name] = kernel

    # ------------------------------------------------------------------------------------------------------------
    # which path
    # ------------------------------------------------------------------------------------------------------------

    def _lora_adapters_in_use(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    def fallback_reason(self) -> str | None:
        """Why the next forward would take PEFT's path, or None when it takes the fused one (input aside)."""
        if self.disable_adapters:
            return "adapters are disabled"
        if self.merged:
            return "adapter weights are merged into the base layer"
        adapters = self._lora_adapters_in_use()
        if len(adapters) != 1:
            return f"{len(adapters)} active adapters on this layer (the fused path runs exactly one)"
        return self._adapter_fallback_reason(adapters[0])

    @property
    def kernel_path(self) -> str:
        """'triton', 'hybrid' (auto's measured table chose cuBLAS GEMMs + Triton LoRA kernels), 'torch-fused' or
        'peft' for inputs on the base weight's device; 'triton-unavailable' if the adapter asks for kernel='triton'
        where it cannot run (the forward would raise)."""
        if self.fallback_reason() is not None:
            return "peft"
        adapter = self._lora_adapters_in_use()[0]
        try:
            weight = self.get_base_layer().weight
            backend = resolve_kernel(self.lora_kernel.get(adapter, "auto"), weight.device, weight.dtype)
        except ValueError:
            return "triton-unavailable"
        return "torch-fused" if backend == "torch" else backend

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        extra_inputs = args or any(value is not None for value in kwargs.values())  # mixed batch, aLoRA offsets...
        base = self.get_base_layer()
        if extra_inputs or self.fallback_reason() is not None or x.dtype != base.weight.dtype:
            return super().forward(x, *args, **kwargs)

        adapter = self._lora_adapters_in_use()[0]
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        operands = (x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # do autocast's casts up front (autograd-tracked) and run the fused function without it
            dtype = torch.get_autocast_dtype(device_type)
            operands = tuple(t.to(dtype) if t is not None else None for t in operands)
            with torch.autocast(device_type, enabled=False):
                return self._fused(adapter, operands, p, dropout.training)
        return self._fused(adapter, operands, p, dropout.training)

    # ---- mixed-adapter batches (see tuner/mixed_batch.py) -----------------------------------------------------------

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        names = kwargs.get("adapter_names")
        if names is not None and len(names) != len(x) and per_token_names(x, names) is not None:
            x = x.reshape(-1, x.shape[-1])  # one name per token (Pixtral's one-row tower): PEFT checks rows
        super()._check_forward_args(x, *args, **kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        used = {name for name in adapter_names if name in self.lora_A}
        plain = all(self._adapter_fallback_reason(name) is None for name in used)
        extra = args or any(value is not None for value in kwargs.values())
        same_dtype = x.dtype == self.get_base_layer().weight.dtype and not torch.is_autocast_enabled(x.device.type)
        if plain and not extra and same_dtype:
            return mixed_lora_forward(self, x, adapter_names)
        if len(adapter_names) == len(x):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in): PEFT's path indexes rows, so give it one row per token
        out = super()._mixed_batch_forward(flat, *args, adapter_names=per_token_names(x, adapter_names), **kwargs)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _adapter_fallback_reason(self, adapter: str) -> str | None:
        """Why `adapter` cannot take the fused path on this layer (in a single-adapter or a mixed batch), or None."""
        base = self.get_base_layer()
        if type(base) is not nn.Linear or "forward" in vars(base) or hasattr(base, "_hf_hook"):
            return f"base layer is {type(base).__name__} with a custom forward, not a plain nn.Linear"
        if base._forward_hooks or base._forward_pre_hooks:
            return "base layer has forward hooks"
        tensors = {"base weight": base.weight, "lora_A": self.lora_A[adapter].weight}
        for name, tensor in tensors.items():
            if not _plain_tensor(tensor):  # e.g. tensor parallelism applied after injection made it a DTensor
                return f"{name} is a {type(tensor).__name__}, not a plain tensor (the fused kernels read raw memory)"
        if adapter in self.lora_variant or self.use_dora.get(adapter, False):
            return f"adapter {adapter!r} is a LoRA variant ({type(self.lora_variant.get(adapter)).__name__})"
        if self.lora_bias.get(adapter, False):
            return "lora_bias=True"
        if self.fan_in_fan_out:
            return "fan_in_fan_out=True"
        if type(self.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
            return f"custom dropout module {type(self.lora_dropout[adapter]).__name__}"
        return None

    def _fused(self, adapter: str, operands: tuple, p: float, training: bool) -> torch.Tensor:
        x, weight, bias, lora_A, lora_B = operands
        # fp32 adapters (PEFT's default upcast) keep their dtype, as in PEFT's layer; any other dtype computes in x's
        if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        kernel = self.lora_kernel.get(adapter, "auto")
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling[adapter], p, training, kernel=kernel)

    def __repr__(self) -> str:
        return "vision_" + super().__repr__()


def _plain_tensor(tensor: torch.Tensor) -> bool:
    return type(tensor) in (nn.Parameter, torch.Tensor)


def _plain_linear(module: nn.Module) -> bool:
    """An exact `nn.Linear` with an ordinary weight: not a quantized/bnb subclass, not a tensor-subclass weight."""
    if type(module) is not nn.Linear:
        return False
    return _plain_tensor(module.weight)


def dispatch_vision_lora(
    target: nn.Module, adapter_name: str, config: Any, parameter_name: str | None = None, **kwargs: Any
) -> nn.Module | None:
    """PEFT dispatcher (first non-None wins): a `VisionLoraLinear` for a plain `nn.Linear`, else None.

    Mirrors the Linear branch of PEFT's `dispatch_default`; put it before that one in `_create_new_module`'s chain.
    Subclasses (bitsandbytes, Llama4's tuple-returning router), tensor-subclass weights (torchao, DTensor) and
    `target_parameters` targets are left to PEFT's own dispatchers.
    """
    if parameter_name is not None:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not _plain_linear(base):
        return None
    custom_modules = getattr(config, "_custom_modules", None) or {}
    if any(isinstance(base, key) for key in custom_modules):  # the user's own LoRA layer for nn.Linear wins
        return None
    if config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out=True but the target module is `torch.nn.Linear`; setting fan_in_fan_out to False.",
            stacklevel=2,
        )
        config.fan_in_fan_out = False
    return VisionLoraLinear(target, adapter_name, config=config, **kwargs)
