"""benchmarks/gpu_smoke.py runs: every check at small shapes in Triton's interpreter (CI), all of them on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_smoke.py"
# what only real hardware can run; every other check must pass in the interpreter
HARDWARE_ONLY = {"ragged_bf16", "cuda_graph_replay", "second_gpu_device_guard"}


def _run(tmp_path: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    report = json.loads((tmp_path / "smoke.json").read_text())
    return done, report


def test_smoke_script_passes_in_the_interpreter(tmp_path):
    done, report = _run(tmp_path, "--interpret", timeout=600)
    lines = done.stdout.strip().splitlines()
    statuses = {r["name"]: r["status"] for r in report["checks"]}
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert {name for name, status in statuses.items() if status == "SKIP"} == HARDWARE_ONLY
    assert all(line.split()[0] in ("PASS", "SKIP") for line in lines[:-1]), lines
    assert lines[-1] == f"{len(statuses) - len(HARDWARE_ONLY)} passed, 0 failed, {len(HARDWARE_ONLY)} skipped"
    assert len(statuses) >= 12


def test_smoke_script_reports_a_failing_check(tmp_path, monkeypatch):
    """The runner turns an exception into `FAIL name: why` and a non-zero exit, and keeps going."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_smoke
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def broken(ctx):
        raise AssertionError("dx: relative error 1e-01 > 1e-04")

    monkeypatch.setattr(gpu_smoke, "CHECKS", [("broken", broken), *gpu_smoke.CHECKS[:0]])
    results = gpu_smoke.run_checks(gpu_smoke.Ctx(interpret=True))
    assert results[0]["status"] == "FAIL" and "dx: relative error" in results[0]["why"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_script_passes_on_the_gpu(tmp_path):
    done, report = _run(tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert (tmp_path / "auto_table.json").exists() and (tmp_path / "benchmarks.md").exists()
