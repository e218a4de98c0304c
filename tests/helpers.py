"""Test helpers: tiny VLMs are built once per session and deep-copied per test."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import peft_vision_lora  # noqa: F401  (registers VISION_LORA)
from peft_vision_lora.zoo.tiny import SUPPORTED_TINY_MODEL_TYPES, build_tiny_vlm, tiny_inputs

# A fast subset that still covers each structural case: merger in the vision tower (qwen2_vl), a projector module
# (llava), cross-attention (mllama), a Q-Former (blip-2).
FAST_MODEL_TYPES = ("qwen2_vl", "llava", "mllama", "blip-2")


@functools.cache
def _cached_model(model_type: str) -> torch.nn.Module:
    return build_tiny_vlm(model_type, seed=0)


@functools.cache
def _cached_inputs(model_type: str) -> dict:
    return tiny_inputs(model_type, batch_size=2, seed=0)


def fresh_model(model_type: str) -> torch.nn.Module:
    """A private copy of the cached tiny model (tests may wrap or mutate it)."""
    return copy.deepcopy(_cached_model(model_type))


def shared_model(model_type: str) -> torch.nn.Module:
    """The cached model itself: only for read-only use (resolution, dry runs)."""
    return _cached_model(model_type)


def inputs_for(model_type: str) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _cached_inputs(model_type).items()}


def model_type_params(model_types=SUPPORTED_TINY_MODEL_TYPES) -> list:
    """Every tiny model type; those outside the fast subset are marked slow (`make test-fast` skips them)."""
    return [pytest.param(t, id=t, marks=() if t in FAST_MODEL_TYPES else pytest.mark.slow) for t in model_types]


def with_answers(batch: dict, trained: list[int]) -> dict:
    """Labels -100 except the last ``trained[i]`` tokens of row ``i``: rows that train different numbers of tokens."""
    labels = torch.full_like(batch["input_ids"], -100)
    for row, count in enumerate(trained):
        if count:
            labels[row, -count:] = batch["input_ids"][row, -count:]
    return {**batch, "labels": labels}
