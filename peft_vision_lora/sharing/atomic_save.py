"""Atomic adapter saves: a save killed midway leaves the previous adapter untouched.

``save_pretrained`` of a model with a ``VISION_LORA`` adapter (see :mod:`.peft_model_hooks`) and :func:`save_adapter`
let PEFT write into a temporary folder next to the target and then swap the folders in one
``renameat2(RENAME_EXCHANGE)`` (Linux). Files of the target that the new save does not produce (a tokenizer,
checkpoints) are hard-linked into the new folder first, so the swap loses nothing that an in-place
``save_pretrained`` would have kept. Where a folder cannot be swapped whole (a symlink, a mount point, a read-only
parent, other ranks of a distributed run writing into it) the files are staged inside it and each is renamed into
place: never a half-written file, but no single switch-over either.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the platform or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None).renameat2  # the C library's symbols (glibc >= 2.28, musl >= 1.2.4)
    except (AttributeError, OSError, TypeError):  # no renameat2: macOS, Windows, an older C library
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (a folder opened read-only can be fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries, so the rename never publishes half-written data after a crash."""
    for path in [*root.rglob("*"), root]:  # in any order: all are flushed before the rename
        if not path.is_symlink():
            _fsync_dir(path)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (or across devices): a copy
        shutil.copy2(src, dst)


def _keep_untouched_entries(target: Path, staged: Path) -> None:
    """Entries of the old folder the new save does not write (tokenizer, checkpoints) move along, as hard links.

    Folders present in both are merged entry by entry, as an in-place save into them would have left them.
    """
    for entry in target.iterdir():
        if not entry.name.startswith(f".{target.name}."):  # else a save to target/NAME is staging: not ours to keep
            _keep_entry(entry, staged / entry.name)


def _keep_entry(entry: Path, destination: Path) -> None:
    if destination.exists() or destination.is_symlink():  # the new save wrote it: it wins, merged if both folders
        if _is_real_dir(entry) and _is_real_dir(destination):
            for inner in entry.iterdir():
                _keep_entry(inner, destination / inner.name)
    elif entry.is_symlink():
        os.symlink(os.readlink(entry), destination)  # the link itself, as copytree(symlinks=True) keeps them
    elif entry.is_dir():
        shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(entry), str(destination))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[Path, str, int]]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            yield entry, match.group(1), int(match.group(2))


def _recover(target: Path) -> None:
    """Clean up after a save that died: restore a moved-away old folder, delete abandoned temporaries."""
    if not target.parent.exists():
        return
    for entry, kind, pid in sorted(_leftovers(target), key=lambda e: e[0].stat().st_mtime, reverse=True):
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process is saving right now
        if kind == "old" and not target.exists():
            logger.warning("Restoring %s from %s (a previous save stopped between two renames).", target, entry)
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _folder_path(target: str | os.PathLike) -> Path:
    """``target`` as an absolute path, refusing an existing file (an adapter is a folder)."""
    target = Path(target).absolute()
    if target.is_file():
        raise ValueError(f"{target} is a file; save the adapter to a folder path.")
    return target


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named empty folder; made by ``mkdir`` (not ``mkdtemp``, which makes it private: 0700)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on a clean exit it replaces ``target`` in one step.

    On an exception the folder is deleted and ``target`` stays as it was. Where ``renameat2`` is missing (not
    Linux), the swap takes two renames; a crash between them leaves the old folder as ``.NAME.old-PID-*``, and the
    next save to the same place restores it before doing anything else.
    """
    target = _folder_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    staged = _new_folder(target.parent, f".{target.name}.tmp-{os.getpid()}-")
    try:
        if target.is_dir():
            os.chmod(staged, stat.S_IMODE(target.stat().st_mode))  # the published folder keeps its permissions
        yield staged
        if target.exists():
            _keep_untouched_entries(target, staged)
        _fsync_tree(staged)
        if not target.exists():
            os.rename(staged, target)
        elif _exchange(staged, target):
            shutil.rmtree(staged)  # now holds the previous version
        else:
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.rmdir(backup)
            os.rename(target, backup)
            os.rename(staged, target)
            shutil.rmtree(backup)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


_STAGED_PREFIX = ".vision-lora-save-tmp-"
# Published last, in this order: a loader that looks between two renames sees the new weights with the old config
# (same ranks when re-saving a run) rather than a new config pointing at old weights.
_PUBLISH_LAST = ("adapter_config.json", "README.md")


def _publish_order(path: Path) -> tuple[bool, bool, str]:
    """Other files first, then each ``adapter_config.json``, then each ``README.md``; by path within each group."""
    return (path.name in _PUBLISH_LAST, path.name == "README.md", path.as_posix())


def _remove_dead_staging(target: Path) -> None:
    """Delete staging folders that dead processes left inside ``target``."""
    pattern = re.compile(rf"{re.escape(_STAGED_PREFIX)}(\d+)-")
    for entry in target.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder inside ``target``; on a clean exit each file in it replaces its namesake in ``target``.

    Each file appears complete or not at all (``os.replace``); unlike :func:`atomic_directory` the files switch
    over one after another, weights before ``adapter_config.json`` and ``README.md``. Used where the folder itself
    must stay where it is. On an exception nothing in ``target`` changes.
    """
    target = _folder_path(target)
    target.resolve().mkdir(parents=True, exist_ok=True)  # resolved: a symlink to a folder not made yet
    _remove_dead_staging(target)
    staged = Path(tempfile.mkdtemp(prefix=f"{_STAGED_PREFIX}{os.getpid()}-", dir=target))
    try:
        yield staged
        _fsync_tree(staged)
        files = sorted((p for p in staged.rglob("*") if not p.is_dir()), key=_publish_order)
        for path in files:
            destination = target / path.relative_to(staged)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        for folder in {(target / p.relative_to(staged)).parent for p in files}:
            _fsync_dir(folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def whole_folder_swap_blocker(target: str | os.PathLike) -> str | None:
    """Why ``target`` cannot be replaced by swapping folders, or None when it can."""
    target = Path(target).absolute()
    if target.is_symlink():
        return "it is a symbolic link, which a swap would replace by a folder"
    if target.is_dir() and os.path.ismount(target):
        return "it is a mount point"
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        return "it holds the current working directory, which a swap would leave deleted"
    if target.parent.exists() and not os.access(target.parent, os.W_OK | os.X_OK):
        return "its parent folder is not writable"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return "other ranks of this distributed run may write into it at the same time"
    return None


_WRITING_STAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("vision_lora_writing_staged", default=False)


def writing_staged() -> bool:
    """True inside :func:`writing_into_private_folder`: ``save_pretrained`` should write in place, unstaged."""
    return _WRITING_STAGED.get()


@contextlib.contextmanager
def writing_into_private_folder() -> Iterator[None]:
    """Saves in this block go to a folder nobody else reads yet (a staging or scratch folder): skip staging."""
    token = _WRITING_STAGED.set(True)
    try:
        yield
    finally:
        _WRITING_STAGED.reset(token)


def model_card_paths(model: nn.Module, selected_adapters: list[str] | None = None) -> list[str]:
    """Where PEFT's ``save_pretrained`` keeps model cards, relative to the folder: it updates them, not replaces."""
    names = selected_adapters if selected_adapters is not None else list(getattr(model, "peft_config", {}))
    return ["README.md"] + [f"{name}/README.md" for name in names if name != "default"]


@contextlib.contextmanager
def atomic_save_folder(target: str | os.PathLike, *, updated_files: list[str] = ()) -> Iterator[Path]:
    """The staging folder for a save to ``target``: swapped in whole where possible, else published file by file.

    ``updated_files`` (relative paths) are files the save reads and rewrites, such as model cards that keep a user's
    text: they are copied into the staging folder first (copied, never linked, so the old ones stay untouched).
    """
    blocker = whole_folder_swap_blocker(target)
    if blocker is not None:
        logger.info("Saving to %s file by file instead of swapping the folder: %s.", target, blocker)
    publish = atomic_directory if blocker is None else atomic_files
    with publish(target) as staged, writing_into_private_folder():
        for relative in updated_files:
            source = Path(target) / relative
            if source.is_file():
                (staged / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staged / relative)
        yield staged


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **save_kwargs)``, atomically, for any PEFT model.

    The previous content of ``save_directory`` stays intact and loadable until the new save is complete, even if the
    process is killed while writing. Models with a ``VISION_LORA`` adapter get the same from ``save_pretrained``
    itself; this function extends it to other PEFT adapters. Returns the folder.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save_adapter needs a PeftModel (with save_pretrained), got {type(model).__name__}.")
    cards = model_card_paths(model, save_kwargs.get("selected_adapters"))
    with atomic_save_folder(save_directory, updated_files=cards) as staged:
        model.save_pretrained(str(staged), **save_kwargs)
    return Path(save_directory)
