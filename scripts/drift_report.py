"""`make test-latest`: run the zoo-wide tests on the newest releases pyproject allows, and report the drift.

Prints the locked and installed versions of the packages we build on, the image-text-to-text model types that
transformers added or removed since the lock (the lock's types are those with hand truth or a stated reason in
tests/zoo_wide_truth.py), and for each new type: whether it builds tiny, which components the resolver finds, and
which generic invariants fail. Exits with the zoo tests' status: non-zero only when a type the lock supports
regresses (new types never fail the tests; they are reported here).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
WATCHED = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "triton",
)
ZOO_TESTS = ["tests/test_zoo.py", "tests/test_selection.py"]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def version_lines() -> list[str]:
    locked = locked_versions()
    lines = [f"{'package':<16} {'lock':>12} {'installed':>12}"]
    for name in WATCHED:
        try:
            installed = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            installed = "-"
        was = locked.get(name.lower().replace("_", "-"), "-")
        lines.append(f"{name:<16} {was:>12} {installed:>12}" + ("" if was == installed else "   <- changed"))
    return lines


def known_model_types() -> set[str]:
    """The types the lock supports: hand truth, or a stated reason why they cannot be built."""
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo_wide_truth import TRUTH, UNBUILDABLE

    return set(TRUTH) | set(UNBUILDABLE)


def new_type_lines(model_type: str) -> list[str]:
    from peft_vision_lora.testing.zoo_invariants import structural_invariant_failures, zoo_type_status

    status = zoo_type_status(model_type)
    if not status.builds:
        return [f"  {model_type}: does not build tiny: {status.error}"]
    found = ", ".join(f"{c}={list(p)}" for c, p in status.components.items()) or "no components"
    lines = [f"  {model_type}: builds tiny ({status.parameters:,} parameters); resolver: {found}"]
    failures = structural_invariant_failures(model_type)
    lines += [f"    invariant broken: {failure}" for failure in failures] or ["    generic invariants hold"]
    return lines


def main() -> int:
    from peft_vision_lora.zoo.catalog import ZOO_MODEL_TYPES

    print("== versions (requirements.lock vs this env) ==")
    print("\n".join(version_lines()))
    known, current = known_model_types(), set(ZOO_MODEL_TYPES)
    added, removed = sorted(current - known), sorted(known - current)
    print(f"\n== model types: {len(current)} in this transformers, {len(known)} at the lock ==")
    print(f"removed since the lock: {', '.join(removed) or 'none'}")
    print(f"added since the lock: {', '.join(added) or 'none'}")
    for model_type in added:
        print("\n".join(new_type_lines(model_type)))
    print("\n== zoo-wide tests (types the lock supports) ==", flush=True)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "", *ZOO_TESTS], cwd=ROOT)
    verdict = "no regression" if result.returncode == 0 else "REGRESSION in a type the lock supports"
    print(f"\ndrift report: {len(added)} new, {len(removed)} removed model types; {verdict}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
