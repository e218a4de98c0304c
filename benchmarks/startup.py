"""Wall-clock times the test suite used to assert: building each tiny VLM, and ``peft-vision-lora --help``.

They moved here from tests/test_tiny_models.py (< 2 s per build) and tests/test_cli.py (< 3 s for ``--help``) because
a timed assertion fails on a busy machine while the code is fine. Each case runs ``--repeats`` times, interleaved
with the others, and the median is printed beside the old budget.

Usage: python benchmarks/startup.py [--repeats 5] [--types llava,qwen2_vl] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from peft_vision_lora.zoo.tiny import SUPPORTED_TINY_MODEL_TYPES, build_tiny_vlm  # noqa: E402

BUILD_BUDGET_S = 2.0
HELP_BUDGET_S = 3.0
HELP_CODE = "from peft_vision_lora_cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"


def time_build(model_type: str) -> float:
    start = time.perf_counter()
    build_tiny_vlm(model_type)
    return time.perf_counter() - start


def time_help() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", HELP_CODE], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", default=",".join(SUPPORTED_TINY_MODEL_TYPES), help="tiny model types to build")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tests build with 1)")
    parser.add_argument("--csv", help="append result rows to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = {f"build {t}": (lambda t=t: time_build(t), BUILD_BUDGET_S) for t in args.types.split(",")}
    cases["peft-vision-lora --help"] = (time_help, HELP_BUDGET_S)
    for case, _ in cases.values():
        case()  # warm-up: imports and first-call caches
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (case, _) in cases.items():  # interleaved: a busy neighbour slows every case alike
            times[name].append(case())
    rows = []
    print(f"{'case':<36} {'median s':>9} {'budget s':>9}")
    for name, (_, budget) in cases.items():
        median = statistics.median(times[name])
        rows.append((name, median, budget))
        print(f"{name:<36} {median:>9.3f} {budget:>9.1f}{'  OVER' if median > budget else ''}")
    if args.csv:
        with open(args.csv, "a") as handle:
            for name, median, budget in rows:
                handle.write(f"{name},{median:.4f},{budget}\n")


if __name__ == "__main__":
    main()
