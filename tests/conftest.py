"""Every test starts from the same global RNG state, on one thread.

Tiny models are dominated by per-op overhead, and CI has 2 cores: one thread per process avoids oversubscription
(also for the subprocesses tests start, through OMP_NUM_THREADS).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, which triton picks when it is first imported
    # (`import peft` already imports it): set it before anything else does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import peft_vision_lora  # noqa: E402, F401  (registers VISION_LORA)

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
