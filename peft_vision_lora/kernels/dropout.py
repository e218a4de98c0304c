"""Dropout masks from a seed: the one definition both backends (torch and Triton) regenerate bit for bit.

Stateless and counter based, so backward regenerates forward's mask from (seed, element index) and nothing is stored;
the seed is a 0-d device tensor (no host sync, nothing for a CUDA graph to freeze or torch.compile to break on).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
