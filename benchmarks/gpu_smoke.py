"""GPU smoke run for the LoRA Linear kernels: a dozen correctness checks, then bf16 benchmarks and the auto table.

Both GPU designs are checked and timed: the full Triton path (`kernels/triton_lora.py`, every GEMM in Triton) and the
hybrid one (`kernels/hybrid.py`, cuBLAS base GEMMs + Triton LoRA-only kernels); the auto table keeps, per dtype and
token bucket, the fastest of torch-fused, Triton and hybrid.

One line per check, `PASS name`, `FAIL name: why` or `SKIP name: why`, then `N passed, M failed, K skipped`; the exit
status is 1 if any check failed. bf16 tolerances follow Liger-Kernel's rule: the kernel's max error against an fp32
reference is at most ~2x torch-bf16's. On a GPU (under 5 minutes on one H100-class card) it then times frozen /
PEFT / torch-fused / Triton layers in bf16 and the torch-fused, Triton and hybrid paths per token bucket, and writes
`smoke.json`, `benchmarks.md` (rows for docs/benchmarks.md) and `auto_table.json` (for kernel="auto") to `--out`.

`--interpret` runs every check at small shapes on CPU under TRITON_INTERPRET=1 (what CI runs); checks that need real
hardware (bf16, TF32, CUDA graphs, a second GPU, timings) are skipped by name.

Usage: python benchmarks/gpu_smoke.py [--out smoke-out]      |      python benchmarks/gpu_smoke.py --interpret
"""

from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:  # before anything imports triton: the kernels are built for the interpreter then
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402
from torch import nn  # noqa: E402

from peft_vision_lora import VisionLoraConfig  # noqa: E402
from peft_vision_lora.kernels import dropout_mask, lora_linear_naive, lora_linear_torch  # noqa: E402
from peft_vision_lora.kernels import hybrid as hy  # noqa: E402
from peft_vision_lora.kernels import triton_lora as tk  # noqa: E402
from peft_vision_lora.tuner.layer import VisionLoraLinear  # noqa: E402
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs  # noqa: E402

# the two GPU designs every kernel check runs (the autotune-config and dx-past-2**31 checks are Triton's own kernels)
FUSED: tuple[tuple[str, Callable], ...] = (("triton", tk.lora_linear_triton), ("hybrid", hy.lora_linear_hybrid))


class Skip(Exception):
    """A check that needs real hardware in this mode."""


CHECKS: list[tuple[str, Callable]] = []


def check(fn: Callable) -> Callable:
    CHECKS.append((fn.__name__.removeprefix("check_"), fn))
    return fn


class Ctx:
    """Device, shape scale and dtype for the mode: GPU sizes on CUDA, small ones in the interpreter."""

    def __init__(self, interpret: bool) -> None:
        self.interpret = interpret
        self.device = torch.device("cpu" if interpret else "cuda")
        self.low = torch.float16 if interpret else torch.bfloat16  # bf16 is wrong in the interpreter

    def rand(self, *shape, scale=1.0, dtype=torch.float32, grad=False, seed=0):
        gen = torch.Generator().manual_seed(seed + sum(shape))
        t = (torch.randn(*shape, generator=gen) * scale).to(self.device, dtype)
        return t.requires_grad_(grad)

    def operands(self, m, k, n, r, dtype=torch.float32, lora_dtype=None, bias=True):
        lora_dtype = lora_dtype or dtype
        return (
            self.rand(m, k, dtype=dtype, grad=True, seed=1),
            self.rand(n, k, scale=k**-0.5, dtype=dtype, seed=2),
            self.rand(n, dtype=dtype, seed=3) if bias else None,
            self.rand(r, k, scale=k**-0.5, dtype=lora_dtype, grad=True, seed=4),
            self.rand(n, r, scale=r**-0.5, dtype=lora_dtype, grad=True, seed=5),
            self.rand(m, n, dtype=dtype, seed=6),
        )


def step(fn, ops, **kwargs) -> list[torch.Tensor]:
    """(y, dx, dA, dB) in fp32 after one forward/backward; grads cleared."""
    x, w, b, a, bb, dy = ops
    y = fn(x, w, b, a, bb, 0.5, **kwargs)
    y.backward(dy.to(y.dtype))
    out = [y.detach().float()] + [t.grad.float() for t in (x, a, bb)]
    for t in (x, a, bb):
        t.grad = None
    return out


def upcast(ops):
    x, w, b, a, bb, dy = (t.detach().float() if t is not None else None for t in ops)
    return x.requires_grad_(True), w, b, a.requires_grad_(True), bb.requires_grad_(True), dy


def close(actual, expected, rtol, what=("y", "dx", "dA", "dB")) -> None:
    """Max error relative to each tensor's scale."""
    for name, a, e in zip(what, actual, expected):
        err = (a - e).abs().max().item() / max(1.0, e.abs().max().item())
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def liger_rule(ctx, ops_low, kernel: Callable = tk.lora_linear_triton, **kwargs) -> None:
    """Kernel error vs fp32 at most 2x torch-low-precision's (plus a floor for near-exact cases)."""
    reference = step(lora_linear_naive, upcast(ops_low), **kwargs.get("naive", {}))
    ours = step(kernel, ops_low, **kwargs.get("fused", {}))
    torch_low = step(lora_linear_naive, ops_low, **kwargs.get("naive", {}))
    label = getattr(kernel, "__name__", "kernel")
    for name, o, t, r in zip(("y", "dx", "dA", "dB"), ours, torch_low, reference):
        kernel_err, torch_err = (o - r).abs().max().item(), (t - r).abs().max().item()
        assert kernel_err <= 2 * torch_err + 1e-3 * max(1.0, r.abs().max().item()), (
            f"{label} {name}: kernel error {kernel_err:.3e} > 2x torch's {torch_err:.3e}"
        )


def fp32_tolerance() -> float:
    return 1e-4 if not torch.backends.cuda.matmul.allow_tf32 else 2e-2


# ------------------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------------------


@check
def check_ragged_low_precision(ctx: Ctx) -> None:
    m, k, n = (4133, 4104, 4136) if not ctx.interpret else (67, 72, 76)
    for dtype in (ctx.low, torch.float16):
        for _, fused in FUSED:
            liger_rule(ctx, ctx.operands(m, k, n, 16, dtype), fused)


@check
def check_ragged_bf16(ctx: Ctx) -> None:
    if ctx.interpret:
        raise Skip("bf16 needs a GPU (the interpreter's bf16 is wrong)")
    for _, fused in FUSED:
        liger_rule(ctx, ctx.operands(1031, 1032, 1033, 16, torch.bfloat16), fused)
        ops = ctx.operands(1031, 1032, 1033, 16, torch.bfloat16)
        liger_rule(ctx, ops, fused, fused={"dropout_p": 0.1, "training": True, "seed": 2}, naive=_naive_mask(ops, 2))


@check
def check_rank_sweep(ctx: Ctx) -> None:
    ranks = (1, 2, 4, 8, 16, 32, 64, 128, 256) if not ctx.interpret else (1, 5, 16, 64, 256)
    m, k, n = (1029, 1030, 1031) if not ctx.interpret else (37, 40, 36)
    for r in ranks:
        ops = ctx.operands(m, k, n, r)
        expected = step(lora_linear_naive, ops)
        for _, fused in FUSED:
            close(step(fused, ops), expected, fp32_tolerance())


@check
def check_every_autotune_config(ctx: Ctx) -> None:
    m, k, n = (1100, 1060, 1030) if not ctx.interpret else (131, 140, 150)
    ops = ctx.operands(m, k, n, 16, ctx.low)
    for fwd in tk.FWD_CONFIGS:
        for dx in tk.DX_CONFIGS:
            with tk.forced_configs(fwd, dx):
                liger_rule(ctx, ops, fused={"dropout_p": 0.1, "training": True, "seed": 1}, naive=_naive_mask(ops, 1))


def _naive_mask(ops, seed, p=0.1):
    x = ops[0]
    return {"dropout_p": p, "training": True, "mask": dropout_mask(seed, x.shape, p, x.device, x.dtype)}


@check
def check_fp32_tf32_on_and_off(ctx: Ctx) -> None:
    ops = ctx.operands(*((777, 520, 390) if not ctx.interpret else (45, 40, 36)), 16)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for _, fused in FUSED:
                close(step(fused, ops), step(lora_linear_naive, ops), fp32_tolerance())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@check
def check_dropout_keep_rate_and_determinism(ctx: Ctx) -> None:
    shape = (2048, 4096) if not ctx.interpret else (64, 96)
    for p in (0.1, 0.5):
        mask = tk.triton_dropout_mask(11, shape, p, ctx.device)
        assert torch.equal(mask, dropout_mask(11, shape, p, ctx.device)), "Triton and torch masks differ"
        keep = mask.mean().item()
        assert abs(keep - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5 + 1e-4, f"keep rate {keep} at p={p}"
    # checkpointed (forward recomputed in backward) equals plain: the seed is drawn from the RNG state checkpoint saves
    x, w, b, a, bb, dy = ctx.operands(48, 64, 40, 8)
    for label, fused in FUSED:
        grads = []
        for checkpointed in (False, True):
            torch.manual_seed(3)

            def f(inp, fused=fused):
                return fused(inp, w, b, a, bb, 0.5, 0.3, training=True)

            y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False) if checkpointed else f(x)
            y.backward(dy)
            grads.append([x.grad.clone(), a.grad.clone()])
            x.grad = a.grad = None
        for plain, ckpt in zip(*grads):
            assert torch.equal(plain, ckpt), f"{label}: checkpointed dropout differs from plain"


def _lazy_strided(ctx: Ctx, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, cols) whose last row starts past 2**31 elements; the storage is allocated lazily, rows touched only."""
    stride = -(-(2**31) // (rows - 1)) + 64
    storage = torch.empty(stride * (rows - 1) + cols, dtype=dtype, device=ctx.device)
    view = storage.as_strided((rows, cols), (stride, 1))
    view.copy_(ctx.rand(rows, cols, dtype=dtype, seed=9))
    return view


@check
def check_int64_row_offsets(ctx: Ctx) -> None:
    if ctx.interpret:  # rows of x past 2**31 elements through a strided view
        x = _lazy_strided(ctx, 3, 32, ctx.low)
        _, w, b, a, bb, _ = ctx.operands(3, 32, 24, 4, ctx.low)
    else:  # M=262,149 x K=8,192 in bf16: 4.3 GB of x
        x = ctx.rand(262_149, 8_192, dtype=torch.bfloat16, seed=9)
        _, w, b, a, bb, _ = ctx.operands(8, 8_192, 256, 16, torch.bfloat16)
    rows = [0, x.shape[0] - 1]
    with torch.no_grad():
        expected = lora_linear_naive(x[rows].float(), w.float(), b.float(), a.float(), bb.float(), 0.5)
        for _, fused in FUSED:
            y = fused(x, w, b, a, bb, 0.5)
            close([y[rows].float()], [expected], 2e-2, what=("y",))
            del y


@check
def check_dx_past_2_31(ctx: Ctx) -> None:
    if ctx.interpret:  # W rows past 2**31 elements through a strided view
        w, m, r = _lazy_strided(ctx, 3, 32, ctx.low), 8, 4
    else:  # a 262,144 x 8,192 output head
        w, m, r = ctx.rand(262_144, 8_192, scale=8192**-0.5, dtype=torch.bfloat16), 64, 16
    n, k = w.shape
    dy, dt, a = ctx.rand(m, n, dtype=w.dtype), ctx.rand(m, r, dtype=w.dtype), ctx.rand(r, k, dtype=w.dtype)
    dx = tk.lora_dx_backward(dy, w, dt, a, None, 0.0)
    expected = dy.float() @ w.float() + dt.float() @ a.float()
    close([dx.float()], [expected], 2e-2, what=("dx",))


@check
def check_strided_and_transposed_inputs(ctx: Ctx) -> None:
    m, k, n = (513, 520, 390) if not ctx.interpret else (33, 40, 36)
    x, w, b, a, bb, dy = ctx.operands(m, k, n, 8)
    wide = ctx.rand(m, k + 24)[:, 5 : 5 + k].requires_grad_(False)  # row stride k + 24
    transposed_x = ctx.rand(k, m).t()  # (m, k) with unit stride along m: copied to rows
    transposed_w = w.t().contiguous().t()  # same values, strides (1, n): read in place
    for xs, ws in ((wide, w), (transposed_x, w), (x.detach(), transposed_w)):
        xs = xs.detach().requires_grad_(True)
        for _, fused in FUSED:
            got = step(fused, (xs, ws, b, a, bb, dy))
            xs.grad = None
            close(got, step(lora_linear_naive, (xs, w, b, a, bb, dy)), fp32_tolerance())


@check
def check_autograd_cases(ctx: Ctx) -> None:
    for _, fused in FUSED:
        _autograd_cases(ctx, fused)


def _autograd_cases(ctx: Ctx, fused: Callable) -> None:
    x, w, b, a, bb, dy = ctx.operands(40, 48, 36, 4)
    for fn in (fused, lora_linear_naive):  # no grad on x: only dA and dB
        fn(x.detach(), w, b, a, bb, 0.5).backward(dy)
    # each fn added once: triton's + naive's; equal halves
    a_grad, bb_grad = a.grad.clone(), bb.grad.clone()
    a.grad = bb.grad = None
    lora_linear_naive(x.detach(), w, b, a, bb, 0.5).backward(dy)
    close([a_grad / 2, bb_grad / 2], [a.grad, bb.grad], 1e-4, what=("dA", "dB"))
    a.grad = bb.grad = None
    grads = []  # unfrozen W and bias, accumulated over two backward passes
    for fn in (fused, lora_linear_naive):
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        for _ in range(2):
            fn(x, wl, bl, a, bb, 0.5).backward(dy)
        grads.append([wl.grad, bl.grad, x.grad.clone(), a.grad.clone()])
        x.grad = a.grad = bb.grad = None
    close(grads[0], grads[1], 1e-4, what=("dW", "db", "dx", "dA"))


@check
def check_fp32_adapters_on_low_precision_base_vs_peft(ctx: Ctx) -> None:
    torch.manual_seed(0)
    base = nn.Linear(96, 80).to(ctx.device, ctx.low).requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False)
    theirs = LoraLinear(copy.deepcopy(base), "default", config=config, r=8, lora_alpha=16)
    ours_config = copy.deepcopy(config)
    ours_config.kernel = "triton"
    ours = VisionLoraLinear(copy.deepcopy(base), "default", config=ours_config, r=8, lora_alpha=16)
    ours.load_state_dict(theirs.state_dict())
    x = ctx.rand(5, 13, 96, dtype=ctx.low)
    results = []
    for layer in (theirs, ours):
        layer.lora_A.float(), layer.lora_B.float()  # get_peft_model's autocast_adapter_dtype=True
        leaf = x.clone().requires_grad_(True)
        layer(leaf).float().square().sum().backward()
        results.append([layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
    assert ours.kernel_path == "triton" and results[1][0].dtype == torch.float32
    close(results[1], results[0], 1e-2 if not ctx.interpret else 2e-3, what=("dA", "dB"))


@check
def check_hybrid_matches_torch_fused(ctx: Ctx) -> None:
    """Hybrid vs. torch-fused with one seed: the same dropped elements, fp32 adapters on a low-precision base, and
    each piece of the hybrid backward (cuBLAS dx + masked LoRA add, Triton dA, cuBLAS dB) on ragged shapes."""
    m, k, n = (2053, 1030, 1031) if not ctx.interpret else (67, 40, 36)
    for r in (5, 16, 64):
        ops = ctx.operands(m, k, n, r)
        kwargs = {"dropout_p": 0.2, "training": True, "seed": torch.tensor(r, device=ctx.device)}
        close(step(hy.lora_linear_hybrid, ops, **kwargs), step(lora_linear_torch, ops, **kwargs), fp32_tolerance())
    ops = ctx.operands(m, k, n, 16, ctx.low, lora_dtype=torch.float32)
    kwargs = {"dropout_p": 0.1, "training": True, "seed": 4}
    close(step(hy.lora_linear_hybrid, ops, **kwargs), step(lora_linear_torch, ops, **kwargs), 1e-2)


@check
def check_tiny_vlm_triton_vs_torch(ctx: Ctx) -> None:
    models = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        config = VisionLoraConfig(r=4, init_lora_weights=False, finetune_projector=True, kernel=kernel)
        models[kernel] = get_peft_model(build_tiny_vlm("qwen2_vl", seed=0), config).to(ctx.device).train()
    set_peft_model_state_dict(models["triton"], get_peft_model_state_dict(models["torch"]))
    batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in tiny_inputs("qwen2_vl", 2, seed=0).items()}
    losses, grads = {}, {}
    for kernel, model in models.items():
        loss = model(**batch).loss
        loss.backward()
        losses[kernel] = loss.item()
        grads[kernel] = [p.grad.float() for p in model.parameters() if p.requires_grad]
    assert abs(losses["triton"] - losses["torch"]) <= 1e-4 * max(1.0, abs(losses["torch"])), losses
    close(grads["triton"], grads["torch"], 1e-3, what=[f"grad{i}" for i in range(len(grads["torch"]))])


def _dropout_layer(ctx: Ctx, kernel: str) -> VisionLoraLinear:
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False)
    config.kernel = kernel
    base = nn.Linear(64, 48).to(ctx.device).requires_grad_(False)
    return VisionLoraLinear(base, "default", config=config, r=8, lora_alpha=16).to(ctx.device).train()


@check
def check_torch_compile(ctx: Ctx) -> None:
    layer = _dropout_layer(ctx, "torch")
    x = ctx.rand(4, 9, 64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    backend = "aot_eager" if ctx.interpret else "inductor"
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    compiled(leaf).square().sum().backward()
    assert leaf.grad is not None and layer.lora_A["default"].weight.grad is not None


@check
def check_cuda_graph_replay(ctx: Ctx) -> None:
    if ctx.interpret:
        raise Skip("CUDA graphs need a GPU")
    layer = _dropout_layer(ctx, "triton")
    static_x = ctx.rand(32, 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm up (autotune, compile) outside the capture
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = layer(static_x)
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append(static_y.clone())
    assert not torch.equal(outputs[0], outputs[1]), "a CUDA graph replayed the same dropout mask"
    layer.eval()
    with torch.no_grad():
        eager = layer(static_x)
    layer.train()
    assert eager.shape == outputs[0].shape
    # the hybrid backend (no kernel= value: the auto table picks it) captured the same way
    base, lora = layer.get_base_layer(), (layer.lora_A["default"].weight, layer.lora_B["default"].weight)

    def hybrid_step():
        return hy.lora_linear_hybrid(static_x, base.weight, base.bias, *lora, 2.0, 0.1, training=True)

    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            hybrid_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = hybrid_step()
    graph.replay()
    first = static_y.clone()
    graph.replay()
    assert not torch.equal(first, static_y), "a CUDA graph replayed the hybrid path's dropout mask"


@check
def check_second_gpu_device_guard(ctx: Ctx) -> None:
    if ctx.interpret or torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs")
    ops = [t.to("cuda:1") if t is not None else None for t in ctx.operands(300, 256, 200, 8)]
    ops = [t.detach().requires_grad_(i in (0, 3, 4)) if t is not None else None for i, t in enumerate(ops)]
    with torch.cuda.device(0):
        for _, fused in FUSED:
            close(step(fused, ops), step(lora_linear_naive, ops), fp32_tolerance())


# ------------------------------------------------------------------------------------------------------------------
# benchmarks (GPU only)
# ------------------------------------------------------------------------------------------------------------------


def _time_interleaved(fns: dict[str, Callable[[], None]], repeats: int = 20) -> dict[str, float]:
    """Median ms per case, the cases run round-robin so that clock drift hits every case alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def benchmark_auto_table(ctx: Ctx, d: int = 4096, r: int = 16) -> tuple[list[dict], list[dict]]:
    """Forward+backward ms of torch-fused, Triton and hybrid per dtype and token bucket (cases interleaved per bucket,
    medians); the fastest of each bucket is its table row."""
    rows, table = [], []
    for dtype in (torch.bfloat16, torch.float16):
        for tokens in (1, 16, 64, 256, 1024, 4096, 16384):
            ops = ctx.operands(tokens, d, d, r, dtype)
            paths = (("torch", lora_linear_torch), *FUSED)
            timings = _time_interleaved({name: (lambda fn=fn, ops=ops: step(fn, ops)) for name, fn in paths})
            best = min(timings, key=timings.get)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, **timings, "auto": best})
            table.append({"dtype": rows[-1]["dtype"], "max_tokens": tokens, "backend": best})
        table[-1]["max_tokens"] = None  # the largest bucket covers everything above
    return rows, table


def run_benchmarks(ctx: Ctx, out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lora_linear  # noqa: PLC0415  (the layer benchmark beside this script)

    args = argparse.Namespace(dtype="bf16", dropout=0.0, repeats=20, warmup=3, device="cuda", threads=None, csv=None)
    layer_rows = [row for shape in lora_linear.SHAPES for row in lora_linear.run_shape(shape, args, ctx.device)]
    auto_rows, table = benchmark_auto_table(ctx)
    (out / "auto_table.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": table}, indent=1))
    lines = [f"GPU smoke run on {torch.cuda.get_device_name()}, bf16, median of 20 (`python benchmarks/gpu_smoke.py`)"]
    lines += ["", "| shape | case | median ms | peak MB |", "|---|---|---|---|"]
    for row in layer_rows:
        lines.append(f"| {row.get('shape')} | {row.get('case')} | {row.get('median_ms', row.get('median'))} | "
                     f"{row.get('peak_mb')} |")  # fmt: skip
    lines += ["", "| dtype | tokens | torch-fused ms | triton ms | hybrid ms | auto |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['dtype']} | {r['tokens']} | {r['torch']:.3f} | {r['triton']:.3f} | {r['hybrid']:.3f} | {r['auto']} |"
        for r in auto_rows
    ]
    (out / "benchmarks.md").write_text("\n".join(lines) + "\n")
    return {"layer": layer_rows, "auto": auto_rows}


# ------------------------------------------------------------------------------------------------------------------
# runner
# ------------------------------------------------------------------------------------------------------------------


def run_checks(ctx: Ctx, only: list[str] | None = None) -> list[dict]:
    results = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            fn(ctx)
            status, why = "PASS", ""
        except Skip as skip:
            status, why = "SKIP", str(skip)
        except Exception as error:  # a check's failure is a report line, not the end of the run
            status, why = "FAIL", f"{type(error).__name__}: {error}".splitlines()[0][:300]
            if os.environ.get("SMOKE_TRACEBACK"):
                traceback.print_exc()
        seconds = time.perf_counter() - start
        print(f"{status} {name}" + (f": {why}" if why else ""), flush=True)
        results.append({"name": name, "status": status, "why": why, "seconds": round(seconds, 2)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interpret", action="store_true", help="CPU, TRITON_INTERPRET=1, small shapes (CI)")
    parser.add_argument("--out", default="smoke-out", help="folder for smoke.json, benchmarks.md, auto_table.json")
    parser.add_argument("--checks", nargs="+", help="run only these checks")
    parser.add_argument("--no-bench", action="store_true", help="checks only")
    args = parser.parse_args(argv)
    if not args.interpret and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --interpret")
    if args.interpret and not tk.INTERPRETED:
        parser.error("triton was imported before TRITON_INTERPRET=1 could be set")
    ctx = Ctx(args.interpret)
    results = run_checks(ctx, args.checks)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "interpret" if args.interpret else "gpu", "checks": results}
    if not args.interpret and not args.no_bench:
        report["device"] = torch.cuda.get_device_name()
        report["benchmarks"] = run_benchmarks(ctx, out)
    (out / "smoke.json").write_text(json.dumps(report, indent=1, default=str))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
