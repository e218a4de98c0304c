"""The atomic save's folder handling, without a model: what a save keeps, what it cleans up, what it flushes.

Recovery after a crash (a staging or moved-away folder left beside the adapter, or a staging folder left inside it),
entries of the old folder that the new save does not write, the swap without ``renameat2``, the reasons a folder is
saved file by file, and the order files are flushed and published in. The two model-level entry points
(``save_pretrained``, ``save_adapter``) are covered by test_atomic_save.py and test_atomic_swap.py.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_vision_lora.sharing import atomic_save as saving
from peft_vision_lora.sharing.atomic_save import atomic_directory, atomic_files, whole_folder_swap_blocker

DEAD = 999_999_999  # above any pid_max (at most 2**22): no process has this id
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")


@pytest.fixture
def live_pid():
    """The id of a running process that is not this one (a saver busy elsewhere); it must never be signalled."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
        assert process.poll() is None, "the other process was signalled"
    finally:
        process.kill()
        process.wait()


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _save(folder: Path, files: dict[str, str]) -> None:
    with atomic_directory(folder) as staged:
        _write(staged, files)


def _failed_save(folder: Path) -> None:
    """A save that fails at once: only its recovery of earlier saves has an effect."""
    with pytest.raises(RuntimeError, match="the save failed"), atomic_directory(folder):
        raise RuntimeError("the save failed")


def _leftover(parent: Path, name: str, text: str, mtime: float) -> Path:
    path = parent / name
    _write(path, {"adapter_model.safetensors": text})
    os.utime(path, (mtime, mtime))
    return path


def _beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# --- recovery beside the folder (whole-folder swaps) ---


@pytest.mark.parametrize("newest", ["a", "b"])
def test_recovery_restores_the_newest_moved_away_folder(tmp_path, caplog, newest):
    # Without renameat2 the swap is two renames; saves that died between them left the folder moved away.
    folder = tmp_path / "adapter"
    for name in ("a", "b"):
        _leftover(tmp_path, f".adapter.old-{DEAD}-{name}", name, mtime=2000 if name == newest else 1000)
    with caplog.at_level(logging.WARNING, logger=saving.__name__):
        _failed_save(folder)
    assert (folder / "adapter_model.safetensors").read_text() == newest
    assert _beside(folder) == []
    source = tmp_path / f".adapter.old-{DEAD}-{newest}"
    assert caplog.messages == [f"Restoring {folder} from {source} (a previous save stopped between two renames)."]


@pytest.mark.parametrize("folder_present", [True, False], ids=["folder-present", "folder-missing"])
def test_recovery_never_publishes_a_half_written_staging_folder(tmp_path, folder_present):
    folder = tmp_path / "adapter"
    if folder_present:
        _write(folder, {"adapter_model.safetensors": "complete"})
        # died after its second rename, before deleting the moved-away previous version
        _leftover(tmp_path, f".adapter.old-{DEAD}-x", "previous", mtime=1000)
    _leftover(tmp_path, f".adapter.tmp-{DEAD}-y", "half", mtime=2000)
    _failed_save(folder)
    assert _beside(folder) == []
    if folder_present:
        assert (folder / "adapter_model.safetensors").read_text() == "complete"
    else:
        assert not folder.exists()


def test_recovery_keeps_the_folders_of_a_saver_still_running(tmp_path, live_pid):
    # Newest first: the running saver's folders are met before the dead one's, which must still be removed.
    folder = tmp_path / "adapter"
    _write(folder, {"adapter_model.safetensors": "complete"})
    _leftover(tmp_path, f".adapter.tmp-{DEAD}-x", "dead", mtime=1000)
    _leftover(tmp_path, f".adapter.old-{live_pid}-y", "previous", mtime=2000)
    _leftover(tmp_path, f".adapter.tmp-{live_pid}-z", "busy", mtime=3000)
    _failed_save(folder)
    assert _beside(folder) == [f".adapter.old-{live_pid}-y", f".adapter.tmp-{live_pid}-z"]
    assert (tmp_path / f".adapter.tmp-{live_pid}-z" / "adapter_model.safetensors").read_text() == "busy"


def test_recovery_removes_folders_named_after_this_process(tmp_path):
    # A job restarted in a container often gets the same pid as the run that died: its folders are dead too.
    folder = tmp_path / "adapter"
    _leftover(tmp_path, f".adapter.tmp-{os.getpid()}-x", "half", mtime=1000)
    _failed_save(folder)
    assert _beside(folder) == [] and not folder.exists()


def test_a_saver_of_another_user_counts_as_running(tmp_path, monkeypatch):
    # Signalling another user's process is refused (EPERM): it exists, so its folder is left alone.
    other, real_kill = 4321, os.kill

    def kill(pid, signal):
        if pid == other:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_kill(pid, signal)

    monkeypatch.setattr(os, "kill", kill)
    folder = tmp_path / "adapter"
    _leftover(tmp_path, f".adapter.tmp-{other}-x", "busy", mtime=1000)
    _save(folder, {"adapter_model.safetensors": "new"})
    assert _beside(folder) == [f".adapter.tmp-{other}-x"]


def test_a_leftover_that_cannot_be_removed_does_not_fail_the_save(tmp_path):
    folder = tmp_path / "adapter"
    (tmp_path / f".adapter.tmp-{DEAD}-x").write_text("a file, not a staging folder")
    _save(folder, {"adapter_model.safetensors": "new"})
    assert (folder / "adapter_model.safetensors").read_text() == "new"


# --- recovery inside the folder (file-by-file saves) ---


def test_file_by_file_save_removes_only_dead_staging_folders(tmp_path, live_pid):
    folder = tmp_path / "adapter"
    _write(folder / f".vision-lora-save-tmp-{DEAD}-x", {"adapter_model.safetensors": "half"})
    _write(folder / f".vision-lora-save-tmp-{live_pid}-y", {"adapter_model.safetensors": "busy"})
    (folder / f".vision-lora-save-tmp-{DEAD}-z").write_text("a file, not a staging folder")
    with atomic_files(folder) as staged:
        _write(staged, {"adapter_model.safetensors": "new"})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f".vision-lora-save-tmp-{DEAD}-z", f".vision-lora-save-tmp-{live_pid}-y", "adapter_model.safetensors"]
    )
    assert (folder / "adapter_model.safetensors").read_text() == "new"


def test_file_by_file_save_publishes_weights_before_configs_before_cards(tmp_path, monkeypatch):
    # A reader between two renames sees new weights with the old config, never a new config with old weights.
    folder = tmp_path / "adapter"
    names = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    published, real_replace = [], os.replace

    def replace(src, dst):
        published.append(Path(dst).relative_to(folder).as_posix())
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_files(folder) as staged:
        _write(staged, {name: "new" for name in names} | {f"extra/{name}": "new" for name in names})
    assert published == [
        "adapter_model.safetensors",
        "extra/adapter_model.safetensors",
        "adapter_config.json",
        "extra/adapter_config.json",
        "README.md",
        "extra/README.md",
    ]


# --- entries the save does not write ---


def _old_folder_with_other_entries(folder: Path) -> None:
    _write(
        folder,
        {
            "adapter_model.safetensors": "old",
            "tokenizer.json": "kept",
            "checkpoint-10/optimizer.pt": "state",
            "language_only/eval.json": "kept",
            "language_only/.language_only.notes": "kept",  # looks like a staging name only at the top
            "was_a_folder/inside.txt": "old",
            "was_a_file": "old",
            **{f"notes-{i}.txt": f"kept {i}" for i in range(8)},
        },
    )
    (folder / "checkpoint-latest").symlink_to("checkpoint-10")
    (folder / "checkpoint-10" / "latest.pt").symlink_to("optimizer.pt")


NEW_FILES = {
    "adapter_model.safetensors": "new",
    "language_only/adapter_model.safetensors": "new",
    "was_a_folder": "new file",
    "was_a_file/inside.txt": "new folder",
}


@pytest.mark.parametrize("linking", ["hard-links", "no-hard-links"])
def test_entries_the_save_does_not_write_are_kept(tmp_path, monkeypatch, linking):
    folder = tmp_path / "adapter"
    _old_folder_with_other_entries(folder)
    inodes = {name: (folder / name).stat().st_ino for name in ("tokenizer.json", "checkpoint-10/optimizer.pt")}
    if linking == "no-hard-links":  # a filesystem without hard links: the kept files are copied instead

        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted", src)

        monkeypatch.setattr(os, "link", no_link)
    _save(folder, NEW_FILES)

    for name, text in NEW_FILES.items():
        assert (folder / name).read_text() == text
    assert (folder / "tokenizer.json").read_text() == "kept"
    assert (folder / "checkpoint-10" / "optimizer.pt").read_text() == "state"
    assert (folder / "language_only" / "eval.json").read_text() == "kept"
    assert (folder / "language_only" / ".language_only.notes").read_text() == "kept"
    assert all((folder / f"notes-{i}.txt").read_text() == f"kept {i}" for i in range(8))
    # still links, not copies of what they point to
    assert os.readlink(folder / "checkpoint-latest") == "checkpoint-10"
    assert os.readlink(folder / "checkpoint-10" / "latest.pt") == "optimizer.pt"
    same_files = {name: (folder / name).stat().st_ino == inode for name, inode in inodes.items()}
    # linked, not copied: a checkpoint of many gigabytes costs nothing to keep
    assert same_files == dict.fromkeys(inodes, linking == "hard-links")
    assert _beside(folder) == []


def test_a_staging_folder_inside_the_folder_is_not_carried_into_the_new_version(tmp_path, live_pid):
    # A save to adapter/adapter stages in adapter/.adapter.tmp-*: not an entry of the adapter folder to keep.
    folder = tmp_path / "adapter"
    _write(folder, {f"notes-{i}.txt": f"kept {i}" for i in range(8)})
    _write(folder / f".adapter.tmp-{live_pid}-x", {"adapter_model.safetensors": "half"})  # made last: listed first
    _save(folder, {"adapter_model.safetensors": "new"})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors"] + [
        f"notes-{i}.txt" for i in range(8)
    ]


# --- the swap ---


def test_exchange_swaps_two_folders_named_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "a", {"name": "a"})
    _write(tmp_path / "b", {"name": "b"})
    assert saving._exchange(Path("a"), Path("b"))
    assert (tmp_path / "a" / "name").read_text() == "b" and (tmp_path / "b" / "name").read_text() == "a"


class _NoRenameat2:
    """A C library without renameat2 (macOS, glibc before 2.28)."""


class _RefusingRenameat2:
    """A filesystem that refuses RENAME_EXCHANGE (EINVAL)."""

    @staticmethod
    def renameat2(*args):
        return -1


def _no_c_library(*args, **kwargs):
    raise OSError("no C library")


@pytest.mark.parametrize(
    "libc",
    [lambda *a, **k: _NoRenameat2(), lambda *a, **k: _RefusingRenameat2(), _no_c_library],
    ids=["no-renameat2", "refused", "no-c-library"],
)
def test_without_renameat2_the_save_takes_two_renames(tmp_path, monkeypatch, libc):
    folder = tmp_path / "adapter"
    _old_folder_with_other_entries(folder)
    monkeypatch.setattr(ctypes, "CDLL", libc)
    assert not saving._exchange(tmp_path / "adapter", tmp_path / "other")
    _save(folder, NEW_FILES)
    for name, text in NEW_FILES.items():
        assert (folder / name).read_text() == text
    assert (folder / "tokenizer.json").read_text() == "kept"
    assert _beside(folder) == []


@LINUX_PROC
def test_every_staged_file_and_folder_is_flushed_before_the_swap_and_the_parent_after(tmp_path, monkeypatch):
    # An fsync is only observable by recording it: after a power loss, an unflushed file could be published empty.
    folder = tmp_path / "adapter"
    _old_folder_with_other_entries(folder)
    flushed, real_fsync = [], os.fsync

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        new_version_published = (folder / "adapter_model.safetensors").read_text() == "new"
        flushed.append((path, new_version_published))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_directory(folder) as staged:
        _write(staged, NEW_FILES)
    # The staging folder held what `folder` holds now: each file and folder once, the link not followed.
    expected = {staged} | {staged / p.relative_to(folder) for p in folder.rglob("*") if not p.is_symlink()}
    assert sorted(flushed[:-1]) == sorted((path.resolve(), False) for path in expected)
    assert flushed[-1] == (tmp_path.resolve(), True)  # the parent, after the swap: the swap itself is durable


# --- why a folder is saved file by file ---


def test_swap_blocker_reasons(tmp_path, monkeypatch):
    plain = tmp_path / "adapter"
    assert whole_folder_swap_blocker(plain) is None
    (tmp_path / "link").symlink_to(plain)
    assert (
        whole_folder_swap_blocker(tmp_path / "link") == "it is a symbolic link, which a swap would replace by a folder"
    )
    assert whole_folder_swap_blocker("/") == "it is a mount point"
    (plain / "inner").mkdir(parents=True)
    monkeypatch.chdir(plain / "inner")
    reason = "it holds the current working directory, which a swap would leave deleted"
    assert whole_folder_swap_blocker(plain / "inner") == reason
    assert whole_folder_swap_blocker(plain) == reason


@pytest.mark.skipif(not os.path.isdir("/proc/sys") or os.access("/proc/sys", os.W_OK), reason="needs /proc/sys")
def test_swap_blocker_read_only_parent():
    # /proc/sys refuses new entries even to root (chmod does not stop root, so a temporary folder cannot stand in).
    assert whole_folder_swap_blocker("/proc/sys/adapter") == "its parent folder is not writable"


@pytest.mark.parametrize("world_size", [1, 2])
def test_swap_blocker_distributed(tmp_path, monkeypatch, world_size):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world_size)
    expected = "other ranks of this distributed run may write into it at the same time" if world_size > 1 else None
    assert whole_folder_swap_blocker(tmp_path / "adapter") == expected


# --- names ---


def test_a_file_is_refused_as_the_target(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_text("weights")
    message = f"{target} is a file; save the adapter to a folder path."
    with pytest.raises(ValueError, match=re.escape(message)), atomic_directory(target):
        pass


def test_the_longest_folder_name_that_fits_beside_its_staging_suffix(tmp_path):
    # `.NAME.tmp-PID-` plus 8 random hex digits must fit the filesystem's 255-byte name limit.
    suffix = len(f"..tmp-{os.getpid()}-") + 8
    folder = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - suffix))
    _save(folder, {"adapter_model.safetensors": "first"})
    _save(folder, {"adapter_model.safetensors": "second"})
    assert (folder / "adapter_model.safetensors").read_text() == "second"


def test_a_new_staging_name_never_reuses_an_existing_folder(tmp_path, monkeypatch):
    draws = iter(["00000000", "11111111"])
    monkeypatch.setattr(saving.secrets, "token_hex", lambda n: next(draws))
    _write(tmp_path / "x-00000000", {"busy": "another save"})
    assert saving._new_folder(tmp_path, "x-") == tmp_path / "x-11111111"
    assert list((tmp_path / "x-11111111").iterdir()) == []
    assert (tmp_path / "x-00000000" / "busy").read_text() == "another save"
