"""LoRA Linear kernels: the pure-torch reference (the spec), optional Triton kernels, and the backend choice."""

from .dispatch import KERNELS, TRITON_AVAILABLE, lora_linear, resolve_kernel, triton_runs_on
from .reference import (
    TorchLoraLinearFunction,
    dropout_mask,
    lora_linear_naive,
    lora_linear_torch,
    new_dropout_seed,
)

__all__ = [
    "KERNELS",
    "TRITON_AVAILABLE",
    "TorchLoraLinearFunction",
    "dropout_mask",
    "lora_linear",
    "lora_linear_naive",
    "lora_linear_torch",
    "new_dropout_seed",
    "resolve_kernel",
    "triton_runs_on",
]
