"""FSDP2 through accelerate: tower blocks as FSDP units, LoRA-only training, and a gathered adapter that reloads.

The end-to-end test runs the shipped example (`accelerate launch --config_file examples/fsdp2_cpu.yaml
examples/train_fsdp2.py`) with 2 CPU processes over gloo, then reloads the adapter in this single process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils.dataclasses import get_module_class_from_name
from helpers import fresh_model, shared_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.integrations.sharding import fsdp_block_class_names, save_gathered_adapter
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 12345  # examples/train_fsdp2.py evaluates the sharded model on this batch
# Sharded and single-process float32 forwards agree to rounding, not bit for bit: FSDP2 runs the (frozen, identical)
# base weights from all-gathered buffers, and even the base model alone then differs by ~1 ulp (~1e-7 here).
SHARDED_ATOL = 1e-6

# Hand-checked: the repeated blocks of every tower, and nothing else (no embeddings, unlike `_no_split_modules`).
BLOCKS = {
    "llava": ["CLIPEncoderLayer", "LlamaDecoderLayer"],
    "qwen2_vl": ["Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"],
    "mllama": ["MllamaVisionEncoderLayer", "MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"],
    "blip-2": ["Blip2EncoderLayer", "OPTDecoderLayer", "Blip2QFormerLayer"],
}


@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_block_classes_are_the_tower_blocks(model_type):
    model = shared_model(model_type)
    names = fsdp_block_class_names(model)
    assert sorted(names) == sorted(BLOCKS[model_type])
    for name in names:  # accelerate resolves the names on the (PEFT-wrapped) model the same way
        assert get_module_class_from_name(model, name) is not None


def test_block_classes_seen_through_the_peft_wrapper():
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=2))
    assert sorted(fsdp_block_class_names(model)) == sorted(BLOCKS["llava"])


@pytest.mark.parametrize(
    "options",
    [{"finetune_projector": "full"}, {"bias": "lora_only"}, {"bias": "all"}],
    ids=["full-projector", "lora-bias", "all-bias"],
)
def test_gathered_save_equals_peft_save_without_sharding(tmp_path, options):
    """Unsharded, the gathered save writes exactly what PeftModel.save_pretrained writes."""
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4, init_lora_weights=False, **options))
    model.save_pretrained(tmp_path / "peft")
    save_gathered_adapter(model, tmp_path / "gathered", is_main_process=True)
    ours = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours) == set(reference)
    assert any("lora_" not in key for key in ours)  # the full projector or the biases, not only LoRA weights
    for key, tensor in reference.items():
        assert torch.equal(ours[key], tensor), key


def test_gathered_save_on_a_rank_that_is_not_main_writes_nothing(tmp_path):
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=2))
    save_gathered_adapter(model, tmp_path / "adapter", is_main_process=False)
    assert not (tmp_path / "adapter").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for _ in range(3):  # the free port can be taken by another process between picking it and binding it: retry
        command = [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "fsdp2_cpu.yaml")]
        command += ["--main_process_port", str(_free_port()), str(ROOT / "examples" / "train_fsdp2.py")]
        command += ["--output-dir", str(out), "--steps", "6"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 or "address already in use" not in (result.stdout + result.stderr).lower():
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.slow
def test_fsdp2_shards_tower_blocks_and_trains_only_lora(fsdp2_run):
    summary = json.loads((fsdp2_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["distributed_type"] == "DistributedType.FSDP"
    assert sorted(summary["wrapped_block_classes"]) == sorted(BLOCKS["llava"])
    units = summary["fsdp_units"]  # 2 vision + 2 decoder blocks, embeddings, lm_head tail, root
    assert units.count("FSDPCLIPEncoderLayer") == 2 and units.count("FSDPLlamaDecoderLayer") == 2
    assert summary["local_params"] < summary["full_params"]  # really sharded: each rank holds about half
    assert summary["trainable"] and all("lora_" in name for name in summary["trainable"])
    assert summary["frozen_lora"] == []
    losses = summary["losses"]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_fsdp2_adapter_is_gathered_and_reloads_on_one_process(fsdp2_run):
    config = VisionLoraConfig(r=8, lora_alpha=16, finetune_projector=True)  # what the script trains
    expected = get_peft_model_state_dict(get_peft_model(build_tiny_vlm("llava", seed=0), config))
    saved = load_file(fsdp2_run / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    for key, tensor in expected.items():  # full shapes, not rank-local shards
        assert saved[key].shape == tensor.shape, key

    model = PeftModel.from_pretrained(build_tiny_vlm("llava", seed=0), fsdp2_run / "adapter").eval()
    batch = tiny_inputs(model, batch_size=2, seed=EVAL_SEED)
    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    sharded = torch.load(fsdp2_run / "sharded_logits.pt")
    sharded_base = torch.load(fsdp2_run / "base_logits.pt")
    torch.testing.assert_close(logits, sharded, rtol=0, atol=SHARDED_ATOL)
    torch.testing.assert_close(base_logits, sharded_base, rtol=0, atol=SHARDED_ATOL)
    assert (logits - base_logits).abs().max() > 100 * SHARDED_ATOL  # the trained adapter changes the outputs
