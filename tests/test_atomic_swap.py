"""The folder swap itself, interrupted and observed: a reader never sees a missing or mixed adapter folder.

A child process runs :func:`atomic_directory` over a folder holding an "old" version and publishes a "new" one. Every
filesystem step of the swap (``renameat2``, ``rename``, ``replace``, ``rmdir``, ``rmtree``) is paused after it
runs; at each pause the parent either reads the folder (it must hold all of the old version or all of the new one,
and the files the save keeps) or kills the child with SIGKILL. test_atomic_save.py kills saves while they write the
staged files; here the kill lands between the steps of the swap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from peft_vision_lora.sharing import atomic_save
from peft_vision_lora.sharing.atomic_save import atomic_directory

FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
KEPT = "tokenizer.json"  # written by someone else, not by the save: it must survive every step

CHILD = textwrap.dedent(
    """
    import importlib.util, os, shutil, sys

    # The module alone, loaded from its file: the package's import (PEFT, transformers) would cost each child seconds.
    # The parent's file and module name: under mutation testing that is the mutated copy, and the name is how its
    # trampolines recognise the mutant to run (MUTANT_UNDER_TEST, inherited from the parent).
    spec = importlib.util.spec_from_file_location(sys.argv[4], sys.argv[3])
    saving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saving)

    folder, mode = sys.argv[1], sys.argv[2]
    depth = 0

    def paused(name, function):
        def step(*args, **kwargs):  # only outermost calls are steps (rmtree calls rmdir inside)
            global depth
            depth += 1
            try:
                result = function(*args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                print("STEP", name, flush=True)
                sys.stdin.readline()  # the parent reads the folder, or kills this process
            return result
        return step

    saving._exchange = (lambda a, b: False) if mode == "two-renames" else paused("renameat2", saving._exchange)
    os.rename, os.replace = paused("rename", os.rename), paused("replace", os.replace)
    os.rmdir, shutil.rmtree = paused("rmdir", os.rmdir), paused("rmtree", shutil.rmtree)
    with saving.atomic_directory(folder) as staged:
        for name in FILES:
            (staged / name).write_text("new " + name)
    print("DONE", flush=True)
    """
).replace("FILES", repr(FILES))


def _write_old(folder) -> None:
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text(f"old {name}")
    (folder / KEPT).write_text("kept")


def _version(folder) -> str:
    """'old' or 'new' when the folder holds one whole version and the kept file; otherwise the test fails."""
    assert folder.is_dir(), "the adapter folder is missing"
    versions = {(folder / name).read_text().split()[0] for name in FILES if (folder / name).is_file()}
    present = [name for name in FILES if (folder / name).is_file()]
    assert present == list(FILES), f"files missing: {sorted(set(FILES) - set(present))}"
    assert len(versions) == 1, f"a mixed folder: {versions}"
    assert (folder / KEPT).read_text() == "kept"
    return versions.pop()


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _start(folder, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), mode, atomic_save.__file__, atomic_save.__name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _next_step(child: subprocess.Popen) -> str:
    """The child's next report: 'STEP <name>' or 'DONE'; fails with its stderr when it died."""
    line = child.stdout.readline().strip()
    if not line:
        child.kill()
        pytest.fail(f"the saving child died: {child.stderr.read()[-3000:]}")
    return line


def _observe(folder, mode: str) -> list[tuple[str, str]]:
    """Run one save to the end, reading the folder after every step; (step, version seen) in order."""
    child = _start(folder, mode)
    seen = []
    try:
        while (line := _next_step(child)) != "DONE":
            seen.append((line.split()[1], _version(folder) if mode == "renameat2" else "unchecked"))
            child.stdin.write("\n")
            child.stdin.flush()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    return seen


@pytest.mark.parametrize("mode", ["renameat2", "two-renames"])
def test_reader_sees_old_then_new_and_never_a_missing_or_mixed_folder(tmp_path, monkeypatch, mode):
    folder = tmp_path / "adapter"
    _write_old(folder)
    seen = _observe(folder, mode)
    assert seen, "the swap took no filesystem step"
    if mode == "renameat2":
        versions = [version for _, version in seen]
        assert versions == sorted(versions, key=["old", "new"].index), versions  # old ... old, new ... new
        assert [step for step, _ in seen][0] == "renameat2"  # the first step publishes: one switch-over
    assert _version(folder) == "new"
    assert _leftovers(folder) == []

    # A further save, in this process, over what the child published. (It also ties this test to the swap's
    # functions for mutmut, which picks the tests to run per mutant by what they call in the test process.)
    if mode == "two-renames":
        monkeypatch.setattr(atomic_save, "_exchange", lambda a, b: False)
    with atomic_directory(folder) as staged:
        for name in FILES:
            (staged / name).write_text(f"newer {name}")
    assert _version(folder) == "newer"
    assert _leftovers(folder) == []


def _steps(tmp_path, mode: str) -> int:
    folder = tmp_path / f"count-{mode}"
    _write_old(folder)
    return len(_observe(folder, mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["renameat2", "two-renames"])
def test_sigkill_between_any_two_steps_of_the_swap_keeps_a_whole_version(tmp_path, mode):
    for kill_after in range(_steps(tmp_path, mode)):
        folder = tmp_path / f"adapter-{kill_after}"
        _write_old(folder)
        child = _start(folder, mode)
        for _ in range(kill_after):
            assert _next_step(child).startswith("STEP")
            child.stdin.write("\n")
            child.stdin.flush()
        step = _next_step(child)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        if mode == "renameat2":
            assert _version(folder) in ("old", "new"), step  # a reader right after the kill
        # Without renameat2 a kill between the two renames leaves the folder moved away: the next save (its own
        # recovery runs first) must bring back a whole version and clean up, even if that save then fails.
        with pytest.raises(RuntimeError, match="next save failed"):
            with atomic_directory(folder):
                raise RuntimeError("next save failed")
        assert _version(folder) in ("old", "new"), step
        assert _leftovers(folder) == [], step
