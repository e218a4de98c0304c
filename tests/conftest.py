"""Every test starts from the same global RNG state."""

import pytest
import torch

import peft_vision_lora  # noqa: F401  (registers VISION_LORA)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
