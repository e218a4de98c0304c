"""Saves replace an adapter folder in one step: a save that dies midway leaves the old adapter loadable.

Both entry points are covered: ``model.save_pretrained`` (PEFT's method, staged by this package for models with a
``VISION_LORA`` adapter) and ``save_adapter`` (the same for any PEFT model). Folders that cannot be swapped whole
(a symlink, other ranks writing into them) get their files staged inside and renamed into place one by one.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import PeftModel, get_peft_model

import peft_vision_lora.sharing.atomic_save as saving
from peft_vision_lora import VisionLoraConfig, save_adapter
from peft_vision_lora.sharing.atomic_save import atomic_directory

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
    """Temporary folders of a save: beside the folder (whole-folder swap) or inside it (file by file)."""
    beside = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    inside = (
        [p.name for p in folder.iterdir() if p.name.startswith(".vision-lora-save-tmp-")] if folder.exists() else []
    )
    return sorted(beside + inside)


SAVES = {
    "save_pretrained": lambda model, folder: model.save_pretrained(folder),
    "save_adapter": save_adapter,
}


CHILD = textwrap.dedent(
    """
    import sys, time
    import peft.peft_model
    import torch
    from peft import get_peft_model
    from peft_vision_lora import VisionLoraConfig, save_adapter
    from peft_vision_lora.zoo.tiny import build_tiny_vlm

    folder, entry = sys.argv[1], sys.argv[2]

    def slow_save_file(tensors, filename, metadata=None):  # stands in for a long write of a large adapter
        with open(filename, "wb") as handle:
            handle.write(b"half of a safetensors file")
            handle.flush()
            print("WRITING", flush=True)
            time.sleep(300)

    peft.peft_model.safe_save_file = slow_save_file
    torch.manual_seed(2)
    config = VisionLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True)
    model = get_peft_model(build_tiny_vlm("llava"), config)
    model.save_pretrained(folder) if entry == "save_pretrained" else save_adapter(model, folder)
    print("FINISHED", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("entry", SAVES)
def test_save_killed_midway_leaves_previous_adapter_intact(tmp_path, entry):
    folder = tmp_path / "adapter"
    first = _adapter(seed=1)
    SAVES[entry](first, folder)
    before, expected = _snapshot(folder), _logits(first)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), entry], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
    SAVES[entry](second, folder)
    assert _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(folder), _logits(second), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_save_into_a_symlink_killed_midway_keeps_link_and_previous_adapter(tmp_path):
    # A symlinked folder cannot be swapped without replacing the link: the files are staged inside instead.
    real = tmp_path / "real"
    folder = tmp_path / "adapter"
    folder.symlink_to(real, target_is_directory=True)
    first = _adapter(seed=1)
    first.save_pretrained(folder)
    before, expected = _snapshot(folder), _logits(first)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), "save_pretrained"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, child.kill)
    watchdog.start()
    try:
        assert child.stdout.readline().strip() == "WRITING", child.stderr.read()[-3000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()

    assert folder.is_symlink()
    leftovers = _leftovers(folder)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".vision-lora-save-tmp-{child.pid}-")
    assert _snapshot(folder) == before
    torch.testing.assert_close(_reloaded_logits(folder), expected, rtol=1e-5, atol=1e-6)

    second = _adapter(seed=3)
    second.save_pretrained(folder)
    assert folder.is_symlink() and _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(real), _logits(second), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", SAVES)
def test_failed_save_keeps_previous_adapter_and_no_temporaries(tmp_path, monkeypatch, entry):
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
        SAVES[entry](_adapter(seed=2), folder)
    assert _snapshot(folder) == before
    assert _leftovers(folder) == []


@pytest.mark.parametrize("entry", SAVES)
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_over_existing_folder_keeps_other_files(tmp_path, monkeypatch, exchange, entry):
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    save_adapter(_adapter(seed=1), folder)
    (folder / "tokenizer.json").write_text('{"kept": true}')
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    second = _adapter(seed=2)

    SAVES[entry](second, folder)
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


def test_save_pretrained_swaps_the_folder_in_one_step(tmp_path):
    folder = tmp_path / "adapter"
    _adapter(seed=1).save_pretrained(folder)
    inode = folder.stat().st_ino
    _adapter(seed=2).save_pretrained(folder)
    assert folder.stat().st_ino != inode  # a new folder took the old one's place


def test_distributed_save_stages_files_inside_the_folder(tmp_path, monkeypatch):
    # Other ranks write into a checkpoint folder while rank 0 saves the adapter (the Trainer's RNG states): the
    # folder must stay the same folder, so its files are renamed into place one by one.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    folder = tmp_path / "checkpoint-10"
    first = _adapter(seed=1)
    first.save_pretrained(folder)
    inode = folder.stat().st_ino
    assert "other ranks" in saving.whole_folder_swap_blocker(folder)

    def rank_1_writes(*args, **kwargs):  # lands while rank 0 is writing its weights
        (folder / "rng_state_1.pth").write_bytes(b"rank 1")
        return original_save(*args, **kwargs)

    import peft.peft_model

    original_save = peft.peft_model.safe_save_file
    monkeypatch.setattr(peft.peft_model, "safe_save_file", rank_1_writes)
    second = _adapter(seed=2)
    second.save_pretrained(folder)
    assert folder.stat().st_ino == inode
    assert (folder / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert _leftovers(folder) == []
    torch.testing.assert_close(_reloaded_logits(folder), _logits(second), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", SAVES)
def test_named_adapters_and_card_text_survive_a_staged_save(tmp_path, entry):
    folder = tmp_path / "adapters"
    model = _adapter(seed=1)
    model.add_adapter("language_only", VisionLoraConfig(r=2, finetune_vision_layers=False))
    SAVES[entry](model, folder)
    for card in (folder / "README.md", folder / "language_only" / "README.md"):
        card.write_text(card.read_text() + "\n## Notes\n\nWritten by hand.\n")
    (folder / "language_only" / "eval.json").write_text("{}")

    SAVES[entry](model, folder)
    for card in (folder / "README.md", folder / "language_only" / "README.md"):
        text = card.read_text()
        assert text.count("Written by hand.") == 1 and text.count("## Adapted components") == 1
    assert (folder / "language_only" / "eval.json").read_text() == "{}"  # merged, not replaced
    reloaded = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), folder)
    reloaded.load_adapter(folder / "language_only", adapter_name="language_only")
    assert set(reloaded.peft_config) == {"default", "language_only"}


def test_save_adapter_saves_only_the_selected_adapters_and_leaves_the_others_as_they_were(tmp_path):
    folder = tmp_path / "adapters"
    model = _adapter(seed=1)
    for name in ("first", "second"):
        model.add_adapter(name, VisionLoraConfig(r=2, finetune_vision_layers=False))
    save_adapter(model, folder)
    (folder / "first" / "README.md").write_text("Written by hand.\n")
    second = {path: path.stat().st_ino for path in (folder / "second").iterdir()}
    top = (folder / "adapter_model.safetensors").stat().st_ino

    save_adapter(model, folder, selected_adapters=["first"])
    assert "Written by hand." in (folder / "first" / "README.md").read_text()
    # the adapters not selected keep the very same files (linked into the new folder, not rewritten or copied)
    assert {path: path.stat().st_ino for path in (folder / "second").iterdir()} == second
    assert (folder / "adapter_model.safetensors").stat().st_ino == top


def test_model_card_paths():
    model = _adapter(seed=1)
    assert saving.model_card_paths(model) == ["README.md"]  # the default adapter's card is the folder's
    for name in ("first", "second"):
        model.add_adapter(name, VisionLoraConfig(r=2, finetune_vision_layers=False))
    assert saving.model_card_paths(model) == ["README.md", "first/README.md", "second/README.md"]
    assert saving.model_card_paths(model, ["second"]) == ["README.md", "second/README.md"]
    assert saving.model_card_paths(torch.nn.Linear(2, 2)) == ["README.md"]  # no adapters at all


def test_save_adapter_refuses_a_model_without_save_pretrained(tmp_path):
    message = "save_adapter needs a PeftModel (with save_pretrained), got Linear."
    with pytest.raises(TypeError, match=re.escape(message)):
        save_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_other_peft_adapters_save_exactly_as_peft_does(tmp_path, monkeypatch):
    from peft import LoraConfig

    def no_staging(*args, **kwargs):
        raise AssertionError("a plain LoRA save was staged")

    monkeypatch.setattr(saving, "atomic_directory", no_staging)
    monkeypatch.setattr(saving, "atomic_files", no_staging)
    model = get_peft_model(fresh_model(MODEL_TYPE), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_non_main_process_writes_nothing(tmp_path):
    _adapter(seed=1).save_pretrained(tmp_path / "adapter", is_main_process=False)
    assert not (tmp_path / "adapter").exists() or not any((tmp_path / "adapter").iterdir())


def test_saving_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    # Swapping the folder the process works in would leave its working directory deleted.
    monkeypatch.chdir(tmp_path)
    first = _adapter(seed=1)
    first.save_pretrained(".")
    second = _adapter(seed=2)
    second.save_pretrained(".")
    assert os.getcwd() == str(tmp_path) and os.path.exists(os.getcwd())
    torch.testing.assert_close(_reloaded_logits(tmp_path), _logits(second), rtol=1e-5, atol=1e-6)


def test_swapped_folder_keeps_its_permissions(tmp_path):
    # The staging folder comes from mkdtemp (private, 0700); the published adapter must stay readable as before.
    folder = tmp_path / "adapter"
    _adapter(seed=1).save_pretrained(folder)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    folder.chmod(0o750)
    _adapter(seed=2).save_pretrained(folder)
    assert folder.stat().st_mode & 0o777 == 0o750
