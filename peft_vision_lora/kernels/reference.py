"""The reference LoRA Linear: the numbers every other path must match.

    y = x W^T + b + s * dropout(x) A^T B^T        W (out, in) frozen, A (r, in), B (out, r)

`lora_linear_naive` is the textbook composition (what PEFT's `Linear.forward` runs), differentiated by autograd.
Tests compare the fused torch path (`torch_fused.py`) and the Triton kernels (`triton_lora.py`) against it; the
dropout masks both regenerate are defined in `dropout.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    if training and dropout_p > 0.0:  # pragma: no mutate (p >= 0 is the same: dropout with p = 0 is the identity)
        if mask is None:
            dropped = F.dropout(x, dropout_p)  # F.dropout's default is training=True
        else:
            dropped = x * mask.view(x.shape) / (1.0 - dropout_p)
    else:
        dropped = x
    return result + F.linear(F.linear(dropped, lora_A), lora_B) * scaling
