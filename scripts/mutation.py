"""Mutation testing of the core modules with mutmut: each module's mutants run against the tests that cover it.

mutmut reads one ``[tool.mutmut]`` table from ``pyproject.toml`` in its working folder, so each module gets a scratch
copy of the package and tests under ``.mutation/<module>/`` with a table naming that module (``only_mutate``) and
its test files (``pytest_add_cli_args_test_selection``). Within those files mutmut runs, per mutant, only the tests
that executed the mutated function. Slow (zoo-wide, multi-process) tests are left out: a mutant must be caught by
the fast suite.

Equivalent mutants are marked where they live, mutmut's way: ``# pragma: no mutate`` with the reason beside it.

Ends with ``mutation score: NN.N% (killed K of N)``; surviving mutants, with their diffs, go to
``.mutation/survivors.txt``. Exits non-zero when a module scores below ``--min-score``.

Usage: python scripts/mutation.py [--modules resolve.targets,sharing.atomic_save] [--jobs 2] [--min-score 85]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
PACKAGE = "peft_vision_lora"


@dataclass(frozen=True)
class CoreModule:
    path: str  # relative to the repository root
    tests: tuple[str, ...]  # the test files that exercise it


# The core: component resolution and module kinds, target compilation, strict loading and atomic saving, the torch
# kernels (reference and fused autograd path), the loss and the collator.
CORE: dict[str, CoreModule] = {
    "resolve.module_kinds": CoreModule(
        "peft_vision_lora/resolve/module_kinds.py", ("tests/test_selection.py", "tests/test_module_kinds.py")
    ),
    "resolve.components": CoreModule(
        "peft_vision_lora/resolve/components.py",
        (
            "tests/test_selection.py",
            "tests/test_explain.py",
            "tests/test_components.py",
            "tests/test_layers_to_transform.py",
            "tests/test_layer_ranges.py",
            "tests/test_override_truth.py",
            "tests/test_zoo.py",
            "tests/test_module_kinds.py",
        ),
    ),
    "resolve.targets": CoreModule(
        "peft_vision_lora/resolve/targets.py",
        (
            "tests/test_selection.py",
            "tests/test_compiled_targets.py",
            "tests/test_layer_ranges.py",
            "tests/test_target_compilation.py",
            "tests/test_layers_to_transform.py",
        ),
    ),
    "resolve.layer_selection": CoreModule(
        "peft_vision_lora/resolve/layer_selection.py",
        ("tests/test_layers_to_transform.py", "tests/test_layer_ranges.py"),
    ),
    "tuner.strict_load": CoreModule(
        "peft_vision_lora/tuner/strict_load.py", ("tests/test_strict_loading.py", "tests/test_load_rollback.py")
    ),
    "sharing.atomic_save": CoreModule(
        "peft_vision_lora/sharing/atomic_save.py",
        ("tests/test_atomic_folders.py", "tests/test_atomic_save.py", "tests/test_atomic_swap.py"),
    ),
    "kernels.reference": CoreModule(
        "peft_vision_lora/kernels/reference.py", ("tests/test_kernels.py", "tests/test_layer.py")
    ),
    "kernels.torch_fused": CoreModule(
        "peft_vision_lora/kernels/torch_fused.py", ("tests/test_kernels.py", "tests/test_layer.py")
    ),
    "integrations.loss": CoreModule(
        "peft_vision_lora/integrations/loss.py",
        ("tests/test_supervised_loss.py", "tests/test_supervised_loss_paths.py"),
    ),
    "data.collator": CoreModule(
        "peft_vision_lora/data/collator.py",
        (
            "tests/test_collator.py",
            "tests/test_collator_any_processor.py",
            "tests/test_collator_truncation.py",
            "tests/test_chat_data.py",
        ),
    ),
}


def mutmut_table(module: CoreModule, tests: list[str]) -> str:
    """The ``[tool.mutmut]`` table for one module (TOML, appended to the scratch copy of pyproject.toml)."""
    return (
        "\n[tool.mutmut]\n"
        f'source_paths = ["{PACKAGE}"]\n'
        f"only_mutate = {json.dumps([module.path])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        # -x: one failure kills the mutant; no durations table; fast tests only
        'pytest_add_cli_args = ["-x", "-q", "-p", "no:randomly", "--durations=0", "-m", "not slow and not gpu"]\n'
    )


def prepare(name: str, module: CoreModule) -> Path:
    """A scratch copy of the package, tests and pyproject with this module's mutmut table; mutmut writes in it."""
    folder = WORK / name
    tests = [t for t in module.tests if (ROOT / t).is_file()]
    if not tests:
        raise SystemExit(f"{name}: none of its test files exist ({', '.join(module.tests)}); fix CORE in {__file__}.")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / PACKAGE, folder / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(pyproject + mutmut_table(module, tests))
    return folder


def run_module(name: str, module: CoreModule, jobs: int) -> tuple[dict, list[str]]:
    """Run mutmut on one module; (counts, survivor reports)."""
    folder = prepare(name, module)
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"== {name}: {module.path} against {', '.join(module.tests)}", flush=True)
    run = subprocess.run([*mutmut, "run", "--max-children", str(jobs)], cwd=folder, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name}: mutmut run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=folder, check=True, capture_output=True)
    counts = json.loads((folder / "mutants" / "mutmut-cicd-stats.json").read_text())
    listed = subprocess.run([*mutmut, "results"], cwd=folder, check=True, capture_output=True, text=True).stdout
    survivors = []
    for line in listed.splitlines():
        key, _, status = line.strip().rpartition(": ")
        if key and status in ("survived", "no tests", "timeout", "suspicious"):
            diff = subprocess.run([*mutmut, "show", key], cwd=folder, capture_output=True, text=True).stdout
            survivors.append(f"[{name}] {status}: {key}\n{diff.rstrip()}\n")
    return counts, survivors


def score(killed: int, total: int) -> float:
    return 100.0 * killed / total if total else 100.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(CORE), help=f"comma-separated, from: {', '.join(CORE)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (the machine has 2 cores)")
    parser.add_argument("--min-score", type=float, default=85.0, help="per-module score below which to fail")
    args = parser.parse_args()
    names = [n for n in args.modules.split(",") if n]
    unknown = [n for n in names if n not in CORE]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(CORE)}")

    rows, survivors = [], []
    for name in names:
        counts, found = run_module(name, CORE[name], args.jobs)
        # killed: by a failing test or a timeout (a mutant that hangs is caught); "no tests": nothing covers it
        killed = counts["killed"] + counts["timeout"]
        total = killed + counts["survived"] + counts["no_tests"] + counts["suspicious"] + counts["segfault"]
        rows.append((name, killed, total))
        survivors += found
        print(f"   {name}: {score(killed, total):.1f}% (killed {killed} of {total})", flush=True)

    WORK.mkdir(exist_ok=True)
    (WORK / "survivors.txt").write_text("\n".join(survivors) or "no surviving mutants\n")
    print(f"\n{'module':<26} {'score':>7} {'killed':>7} {'total':>6}")
    for name, killed, total in rows:
        print(f"{name:<26} {score(killed, total):>6.1f}% {killed:>7} {total:>6}")
    killed, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"surviving mutants: {WORK / 'survivors.txt'}")
    print(f"mutation score: {score(killed, total):.1f}% (killed {killed} of {total})")
    low = [name for name, k, t in rows if score(k, t) < args.min_score]
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
