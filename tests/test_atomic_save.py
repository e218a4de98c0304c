"""``save_adapter`` replaces an adapter folder in one step: a save that dies midway leaves the old adapter loadable."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import PeftModel, get_peft_model

import peft_vision_lora.saving as saving
from peft_vision_lora import VisionLoraConfig, save_adapter
from peft_vision_lora.saving import atomic_directory

MODEL_TYPE = "llava"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def _adapter(seed: int):
    torch.manual_seed(seed)  # init_lora_weights=False draws A and B from the global RNG: a different adapter per seed
    config = VisionLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True)
    return get_peft_model(fresh_model(MODEL_TYPE), config).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(MODEL_TYPE)).logits


def _reloaded_logits(folder) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(fresh_model(MODEL_TYPE), folder).eval())


def _snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


CHILD = textwrap.dedent(
    """
    import sys, time
    import peft.peft_model
    import torch
    from peft import get_peft_model
    from peft_vision_lora import VisionLoraConfig, save_adapter
    from peft_vision_lora.tiny_models import build_tiny_vlm

    def slow_save_file(tensors, filename, metadata=None):  # stands in for a long write of a large adapter
        with open(filename, "wb") as handle:
            handle.write(b"half of a safetensors file")
            handle.flush()
            print("WRITING", flush=True)
            time.sleep(300)

    peft.peft_model.safe_save_file = slow_save_file
    torch.manual_seed(2)
    config = VisionLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True)
    save_adapter(get_peft_model(build_tiny_vlm("llava"), config), sys.argv[1])
    print("FINISHED", flush=True)
    """
)


@pytest.mark.slow
def test_save_killed_midway_leaves_previous_adapter_intact(tmp_path):
    folder = tmp_path / "adapter"
    first = _adapter(seed=1)
    save_adapter(first, folder)
    before, expected = _snapshot(folder), _logits(first)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(240, child.kill)
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read()[-3000:]
        os.kill(child.pid, signal.SIGKILL)  # mid-write, as a preempted job or OOM kill would
        child.wait()
    finally:
        watchdog.cancel()
    assert child.returncode == -signal.SIGKILL

    # The half-written save sits in a temporary folder beside the adapter; the adapter itself is untouched.
    leftovers = _leftovers(folder)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".adapter.tmp-{child.pid}-")
    assert (tmp_path / leftovers[0] / "adapter_model.safetensors").read_bytes() == b"half of a safetensors file"
    assert _snapshot(folder) == before
    torch.testing.assert_close(_reloaded_logits(folder), expected, rtol=1e-5, atol=1e-6)

    # The next save cleans up after the dead one and publishes the new adapter.
    second = _adapter(seed=3)
    save_adapter(second, folder)
    assert _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(folder), _logits(second), rtol=1e-5, atol=1e-6)


def test_failed_save_keeps_previous_adapter_and_no_temporaries(tmp_path, monkeypatch):
    import peft.peft_model

    folder = tmp_path / "adapter"
    save_adapter(_adapter(seed=1), folder)
    before = _snapshot(folder)

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_adapter(seed=2), folder)
    assert _snapshot(folder) == before
    assert _leftovers(folder) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_over_existing_folder_keeps_other_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    save_adapter(_adapter(seed=1), folder)
    (folder / "tokenizer.json").write_text('{"kept": true}')
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    second = _adapter(seed=2)

    assert save_adapter(second, folder) == folder
    assert (folder / "tokenizer.json").read_text() == '{"kept": true}'
    assert (folder / "checkpoint-10" / "optimizer.pt").read_bytes() == b"state"
    assert _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(folder), _logits(second), rtol=1e-5, atol=1e-6)


def test_folder_moved_away_by_a_crashed_save_is_restored(tmp_path):
    # Without renameat2 the swap is two renames; a crash between them leaves only `.NAME.old-PID-*`.
    folder = tmp_path / "adapter"
    first = _adapter(seed=1)
    save_adapter(first, folder)
    os.rename(folder, tmp_path / ".adapter.old-999999999-crashed")  # no such pid: the saver is gone
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(folder):
            raise RuntimeError("interrupted")
    assert _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(folder), _logits(first), rtol=1e-5, atol=1e-6)
