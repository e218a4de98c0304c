"""Save adapters atomically, load them strictly, and push them to the Hub with their model card.

Atomic saves: ``save_pretrained`` of a model with a ``VISION_LORA`` adapter (see :mod:`.peft_model_hooks`) and
``save_adapter`` let PEFT write into a temporary folder next to the target and then swap the folders in one
``renameat2(RENAME_EXCHANGE)`` (Linux); a save killed midway leaves the previous adapter untouched. Files of the
target that the new save does not produce (a tokenizer, checkpoints) are hard-linked into the new folder first, so
the swap loses nothing that an in-place ``save_pretrained`` would have kept. Where a folder cannot be swapped whole
(a symlink, a mount point, a read-only parent, other ranks of a distributed run writing into it) the files are
staged inside it and each is renamed into place: never a half-written file, but no single switch-over either.

Strict loading: ``VisionLoraModel._remap_adapter_state_dict_for_load`` (PEFT's per-tuner load hook) calls
``remap_and_check`` so that every adapter weight must land on a module of the model and every adapted module must
get its weights; anything else raises :class:`AdapterLoadError` naming the keys. Keys saved under an older
transformers module layout (``language_model.model.layers`` before ``model.language_model.layers``) are renamed with
transformers' own checkpoint-conversion rules for the model, and the rename is logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import ModulesToSaveWrapper
from torch import nn

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
HUB_FILE_SUFFIXES = (".safetensors", ".json", ".md")
_SHOWN_KEYS = 12


class AdapterLoadError(ValueError):
    """Adapter weights do not fit the model: some weights match no module, or some adapted modules got none."""


# ----------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------


def _model_keys(model: nn.Module) -> tuple[set[str], Callable[[str], str]]:
    """The model's state-dict keys and a function putting checkpoint keys in the same form (prefix or not)."""
    keys = set(model.state_dict())
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return keys, lambda k: k
    # Adapter injected into a bare model (transformers integration): PEFT strips the prefix after the remap.
    return keys, lambda k: k.removeprefix(PEFT_PREFIX)


def adapter_parameter_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """State-dict keys that belong to ``adapter_name``: its LoRA tensors and its ``modules_to_save`` copies."""
    state = model.state_dict()
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    keys = set(_filter_state_dict_by_key_prefixes(state, prefixes))
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            prefix = f"{name}.modules_to_save.{adapter_name}."
            keys.update(k for k in state if k.startswith(prefix))
    return keys


def _legacy_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """transformers' key renames for this model class (module-layout changes between versions), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(getattr(base, "config", None), "model_type"):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers < 5
        return None
    renamings = [c for c in get_model_conversion_mapping(base) if isinstance(c, WeightRenaming)]
    if not renamings:
        return None
    return lambda key: rename_source_key(key, renamings, [])[0]


def _rename_summary(renames: dict[str, str]) -> str:
    """``old.prefix.* -> new.prefix.* (N keys)`` lines: the part before the common tail of each pair."""
    counts: Counter[tuple[str, str]] = Counter()
    for old, new in renames.items():
        old_parts, new_parts = old.removeprefix(PEFT_PREFIX).split("."), new.removeprefix(PEFT_PREFIX).split(".")
        tail = 0
        while tail < min(len(old_parts), len(new_parts)) and old_parts[-1 - tail] == new_parts[-1 - tail]:
            tail += 1
        if tail == min(len(old_parts), len(new_parts)):
            tail -= 1  # one side is a suffix of the other: show the first shared segment too
        counts[(".".join(old_parts[: len(old_parts) - tail]), ".".join(new_parts[: len(new_parts) - tail]))] += 1
    return "; ".join(f"{old}.* -> {new}.* ({n} keys)" for (old, new), n in sorted(counts.items()))


def rename_legacy_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> key in the model's current layout, for the given keys that transformers would rename."""
    rename = _legacy_renamer(model)
    if rename is None:
        return {}
    renames = {}
    for key in keys:
        bare = key.removeprefix(PEFT_PREFIX)
        new = rename(bare)
        if new != bare:
            renames[key] = key[: len(key) - len(bare)] + new
    return renames


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"[{shown}{f', ... ({len(keys) - _SHOWN_KEYS} more)' if len(keys) > _SHOWN_KEYS else ''}]"


def check_adapter_keys(model: nn.Module, adapter_name: str, remapped: dict[str, Any], base_model: str | None) -> None:
    """Raise :class:`AdapterLoadError` unless ``remapped`` (model-form keys) covers the adapter exactly."""
    model_keys, normalise = _model_keys(model)
    unexpected = sorted(k for k in remapped if normalise(k) not in model_keys)
    loaded = {normalise(k) for k in remapped}
    missing = sorted(k for k in adapter_parameter_keys(model, adapter_name) if k not in loaded)
    if not unexpected and not missing:
        return
    lines = [f"Adapter '{adapter_name}' does not fit this model; nothing was loaded."]
    if unexpected:
        lines.append(f"{len(unexpected)} adapter weight(s) match no module of the model: {_format_keys(unexpected)}.")
    if missing:
        lines.append(f"{len(missing)} adapted parameter(s) got no weights: {_format_keys(missing)}.")
    lines.append(
        f"Load the adapter onto the base model it was trained on (adapter_config.json says "
        f"base_model_name_or_path={base_model!r}) with a transformers version that uses the same module names, or "
        "re-save it from a model with this layout."
    )
    raise AdapterLoadError(" ".join(lines))


def remap_and_check(
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    model: nn.Module,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor],
    base_model: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run PEFT's key remap; rename keys of an older module layout if needed; then demand an exact fit."""
    remapped = remap(state_dict)
    model_keys, normalise = _model_keys(model)
    stray = [k for k in remapped if normalise(k) not in model_keys]
    renames = rename_legacy_keys(model, stray) if stray else {}
    if renames:
        logger.warning(
            "Adapter '%s' was saved with an older transformers module layout; remapped %d key(s): %s",
            adapter_name,
            len(renames),
            _rename_summary(renames),
        )
        remapped = remap({renames.get(k, k): v for k, v in state_dict.items()})
    check_adapter_keys(model, adapter_name, remapped, base_model)
    return remapped


# ----------------------------------------------------------------------------------------------------------------
# Atomic folders
# ----------------------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the platform or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries, so the rename never publishes half-written data after a crash."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        if not path.is_symlink():
            _fsync_dir(path)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _keep_untouched_entries(target: Path, staged: Path, *, top: bool = True) -> None:
    """Entries of the old folder the new save does not write (tokenizer, checkpoints) move along, as hard links.

    Folders present in both are merged entry by entry, as an in-place save into them would have left them.
    """
    for entry in target.iterdir():
        destination = staged / entry.name
        if top and entry.name.startswith(f".{target.name}."):
            continue
        if destination.exists() or destination.is_symlink():
            if _is_real_dir(entry) and _is_real_dir(destination):
                _keep_untouched_entries(entry, destination, top=False)
            continue
        if _is_real_dir(entry):
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
        if _pid_alive(pid) and pid != os.getpid():
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


def _publish_order(path: Path) -> tuple[int, str]:
    return (_PUBLISH_LAST.index(path.name) + 1 if path.name in _PUBLISH_LAST else 0, path.as_posix())


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


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------


DEFAULT_COMMIT_MESSAGE = "Upload adapter (peft-vision-lora)"


def _existing_card(repo_id: str, token: str | bool | None) -> str | None:
    """The repo's README.md, kept as transformers' ``push_to_hub`` keeps it; None for a repo without one."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return ModelCard.load(repo_id, token=token).content
    except EntryNotFoundError:
        return None


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    selected_adapters: list[str] | None = None,
):
    """Upload the adapter weights (safetensors only), its config and the model card to ``repo_id``, portable.

    The upload is in the portable format (:mod:`.portable`): ``adapter_config.json`` is plain LoRA, which PEFT alone
    and serving stacks load, and ``vision_lora_config.json`` keeps the full ``VisionLoraConfig`` for this package.

    What ``model.push_to_hub`` runs for models with a ``VISION_LORA`` adapter (transformers' own mixin would replace
    README.md with a generic transformers card). The card is the one ``save_pretrained`` writes, with loading
    instructions naming ``repo_id``; a card already on the Hub is updated, keeping text written outside our section.
    Returns ``HfApi.create_commit``'s ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .card import add_tags, write_model_card

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        except HfHubHTTPError as error:  # as transformers: no right to branch, but a PR may still be opened
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    existing_card = _existing_card(repo_id, token)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if existing_card is not None:
            (folder / "README.md").write_text(existing_card, encoding="utf-8")
        with writing_into_private_folder():
            # portable: plain LoRA in adapter_config.json (PEFT alone loads it), full config in the sidecar
            model.save_pretrained(
                str(folder), safe_serialization=True, selected_adapters=selected_adapters, portable=True
            )
        for config_file in folder.rglob("adapter_config.json"):
            adapter_dir = config_file.parent
            name = adapter_dir.relative_to(folder).as_posix()
            adapter = model.peft_config["default" if name == "." else name]
            write_model_card(adapter_dir, adapter, repo_id=repo_id, subfolder=None if name == "." else name)
        if tags:
            for readme in folder.rglob("README.md"):
                add_tags(readme, list(tags))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(HUB_FILE_SUFFIXES))
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
