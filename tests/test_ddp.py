"""Multi-process training: DDP with text-only batches, where the vision adapters sit out a step.

DDP all-reduces gradients in buckets and, by default, expects every parameter to receive a gradient each step. A
batch without images never runs the vision tower, so its LoRA weights get none: with ``find_unused_parameters=False``
the next step fails with "Expected to have finished reduction in the prior iteration" (or, when ranks disagree about
which parameters were used, hangs). ``examples/finetune_vlm.py`` sets ``ddp_find_unused_parameters=True``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import fresh_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.zoo.tiny import tiny_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_text_only_step_needs_find_unused_parameters(single_rank_group, find_unused):
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task="captioning"))
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    vision = [p for n, p in model.named_parameters() if p.requires_grad and ".visual." in n and "lora_B" in n]
    ddp(**tiny_inputs("qwen2_vl", with_images=False)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in vision)  # the vision adapters sat this step out
    if not find_unused:
        with pytest.raises(RuntimeError, match="Expected to have finished reduction"):
            ddp(**tiny_inputs("qwen2_vl")).loss.backward()
        return
    model.zero_grad()
    ddp(**tiny_inputs("qwen2_vl")).loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in vision)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_with_text_only_batches(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "examples", "accelerate_ddp.yaml"),
        "--main_process_port", str(_free_port()),
        os.path.join(ROOT, "examples", "finetune_vlm.py"),
        "--steps", "4", "--batch-size", "2", "--train-size", "16", "--text-only-fraction", "0.5",
        "--eval-size", "0", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["batches"] == 4 for rank in ranks)
    assert sum(rank["text_only_batches"] for rank in ranks) > 0, "no text-only batch: the test proves nothing"
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert len(summary["losses"]) == 4 and all(torch.isfinite(torch.tensor([loss for _, loss in summary["losses"]])))

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from finetune_vlm import build_base
    finally:
        sys.path.pop(0)
    reloaded = PeftModel.from_pretrained(build_base("qwen2_vl"), str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    vision_b = [v for k, v in saved.items() if ".visual." in k and "lora_B" in k]
    assert vision_b and all(v.any() for v in vision_b), "vision adapters were not trained"
    with torch.no_grad():
        assert torch.isfinite(reloaded(**tiny_inputs("qwen2_vl")).loss)
