"""LoRA Linear kernels on tensors only: the reference (the spec), the fused torch path, the optional Triton kernels
(imported where they run), the shared dropout masks and helpers, and the backend choice."""

from .dispatch import KERNELS, TRITON_AVAILABLE, lora_linear, resolve_kernel, triton_runs_on
from .dropout import dropout_mask, new_dropout_seed
from .reference import lora_linear_naive
from .torch_fused import TorchLoraLinearFunction, lora_linear_torch

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
