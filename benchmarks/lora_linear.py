"""Forward+backward time and peak memory of one LoRA Linear: frozen base vs. PEFT LoRA vs. ours.

Cases (one training step each: `y = layer(x)`, `y.backward(dy)`, with `x.requires_grad=True` as inside a network):
  frozen-linear   the frozen `nn.Linear` alone: the floor every LoRA layer pays
  peft-lora       `peft.tuners.lora.layer.Linear`
  ours-torch      `VisionLoraLinear` with kernel="torch" (hand-written autograd Function, seeded dropout)
  ours-triton     `VisionLoraLinear` with kernel="triton" (CUDA only)

Timing: all cases run round-robin, `--repeats` rounds after `--warmup` rounds, so that drifting clocks or a busy
neighbour hit every case alike; we report the median per case, and the minimum (noise only ever adds time). On a
shared 2-core machine a busy neighbour stalls every multi-threaded op, which inflates layers with more small ops: run
when the machine is idle, or compare with `--threads 1`.

Peak memory (MB above what exists before the step: inputs, weights, dy):
  CUDA: `torch.cuda.max_memory_allocated()` during one step minus `memory_allocated()` before it.
  CPU:  torch has no CPU allocator statistics and RSS barely moves for freed-and-reused blocks, so we count tensor
        storage: a `TorchDispatchMode` adds the bytes of every storage an op newly allocates and subtracts them when
        the storage is freed; the peak of that running sum over one step is reported. It counts exactly what torch
        allocates for tensors (activations, grads, temporaries, saved tensors), not allocator slack or Python objects.

Usage: python benchmarks/lora_linear.py [--shapes cpu-small vit-block llm-proj] [--dtype fp32] [--dropout 0.0]
       [--repeats 30] [--csv results.csv]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args  # noqa: E402

from peft_vision_lora.kernels import TRITON_AVAILABLE  # noqa: E402
from peft_vision_lora.tuner.layer import VisionLoraLinear  # noqa: E402

SHAPES = {  # name: (tokens, in_features, out_features, rank)
    "cpu-small": (2048, 1024, 1024, 16),
    "vit-block": (4096, 1024, 4096, 16),
    "llm-proj": (8192, 4096, 4096, 16),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _StoragePeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by torch ops while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._live_ptrs: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._live_ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in existing or ptr in self._live_ptrs:  # a view, in-place result or known block
                continue
            self._live_ptrs.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def _make_cases(shape: tuple[int, int, int, int], dtype: torch.dtype, dropout: float, device: torch.device):
    tokens, d_in, d_out, rank = shape
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights="gaussian")
    cases: dict[str, nn.Module] = {"frozen-linear": base}
    peft_layer = PeftLoraLinear(copy.deepcopy(base), "default", config=config, r=rank, lora_alpha=2 * rank)
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)  # a trained-looking adapter, not B = 0
    cases["peft-lora"] = peft_layer
    kernels = ["torch"] + (["triton"] if device.type == "cuda" and TRITON_AVAILABLE else [])
    for kernel in kernels:
        config.kernel = kernel
        ours = VisionLoraLinear(copy.deepcopy(base), "default", config=config, r=rank, lora_alpha=2 * rank)
        ours.load_state_dict(peft_layer.state_dict())
        cases[f"ours-{kernel}"] = ours.to(device, dtype)
    for layer in cases.values():
        layer.to(device=device, dtype=dtype).train()
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d_out, device=device, dtype=dtype)
    return cases, x, dy


def _step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        layer(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _StoragePeak() as tracker:
        step()
    return tracker.peak / 2**20


def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Milliseconds per call of each step, run round-robin so that drift and a busy neighbour hit every case."""
    times: dict[str, list[float]] = {case: [] for case in steps}
    for round_index in range(warmup + repeats):
        for case, step in steps.items():  # interleaved: every round runs every case once
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_index >= warmup:
                times[case].append((time.perf_counter() - start) * 1e3)
    return times


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu} x{torch.get_num_threads()} threads"


def run_shape(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    cases, x, dy = _make_cases(SHAPES[name], dtype, args.dropout, device)
    steps = {case: _step_fn(layer, x, dy) for case, layer in cases.items()}
    times = time_interleaved(steps, args.warmup, args.repeats, device)
    rows = []
    for case, step in steps.items():
        rows.append(
            {
                "machine": _machine(device),
                "dtype": args.dtype,
                "shape": name,
                "dropout": args.dropout,
                "case": case,
                "median_ms": statistics.median(times[case]),
                "min_ms": min(times[case]),
                "peak_mb": _peak_mb(step, device),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    by_case = {row["case"]: row for row in rows}
    frozen, peft_row = by_case["frozen-linear"], by_case["peft-lora"]
    first = rows[0]
    print(f"\n{first['shape']}  {SHAPES[first['shape']]}  dtype={first['dtype']}  dropout={first['dropout']}")
    print(
        f"{'case':<15}{'median ms':>11}{'x frozen':>10}{'x peft':>9}{'min ms':>9}{'x frozen':>10}"
        f"{'peak MB':>10}{'mem x peft':>12}"
    )
    for row in rows:
        print(
            f"{row['case']:<15}{row['median_ms']:>11.2f}{row['median_ms'] / frozen['median_ms']:>10.3f}"
            f"{row['median_ms'] / peft_row['median_ms']:>9.3f}{row['min_ms']:>9.2f}"
            f"{row['min_ms'] / frozen['min_ms']:>10.3f}{row['peak_mb']:>10.1f}"
            f"{row['peak_mb'] / max(peft_row['peak_mb'], 1e-9):>12.2f}"
        )


def append_csv(path: str, rows: list[dict]) -> None:
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: all on CUDA, cpu-small on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--dropout", type=float, default=0.0)
    add_common_args(parser, repeats=30, warmup=3)
    args = parser.parse_args(argv)
    device = apply_common_args(args)
    shapes = args.shapes or (list(SHAPES) if device.type == "cuda" else ["cpu-small"])
    torch.manual_seed(0)
    for name in shapes:
        rows = run_shape(name, args, device)
        print_table(rows)
        if args.csv:
            append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
