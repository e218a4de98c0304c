"""Training step with the model's own loss vs. ``supervised_loss`` (logits only at trained tokens).

Setting of issue 14: a Qwen2-VL-shaped model (text hidden 256, 4 layers, Qwen's 151,936-token vocabulary, random
init, no download), batch 2 of 1,030 tokens (6 image-block tokens + 1,024 text), the last ``T`` tokens of each row
trained (``--trained 4 64 256``), VISION_LORA r 16 on every component. One step = forward, backward, AdamW step.

Every case runs in a fresh process (so one case's allocations never inflate another's high-water mark), cases
interleaved round by round; the parent reports medians. Memory: growth of the resident high-water mark
(``ru_maxrss``) over the resident size before the first step, and ``torch.cuda.max_memory_allocated`` on CUDA.

Usage: python benchmarks/supervised_loss.py [--trained 4 64 256] [--rounds 3] [--steps 3] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args  # noqa: E402
from lora_linear import _machine, append_csv  # noqa: E402

CASES = ("own", "supervised")


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def worker(args: argparse.Namespace) -> dict:
    """One case in this process: build, step ``--steps`` times, report median ms and memory growth."""
    from peft import get_peft_model

    from peft_vision_lora import VisionLoraConfig, supervised_loss
    from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

    device = apply_common_args(args)
    text = {
        "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": args.hidden // 4, "vocab_size": args.vocab,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    }  # fmt: skip
    vision = {"hidden_size": args.hidden}  # the merger's output width: the text model's
    base = build_tiny_vlm("qwen2_vl", text_config=text, vision_config=vision, vocab_size=args.vocab)
    model = get_peft_model(base, VisionLoraConfig(r=16, task="captioning")).to(device).train()
    batch = tiny_inputs(model, batch_size=2, seq_len=args.seq - 6, seed=0)
    labels = torch.full_like(batch["labels"], -100)
    labels[:, -args.trained :] = batch["input_ids"][:, -args.trained :]
    batch = {k: v.to(device) for k, v in {**batch, "labels": labels}.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_of = (lambda: model(**batch).loss) if args.case == "own" else (lambda: supervised_loss(model, batch))

    before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    result = {
        "ms": statistics.median(times[1:] if len(times) > 1 else times),  # the first step pays one-off costs
        "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
        "first_loss": losses[0],
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained", type=int, nargs="+", default=[4, 64, 256], help="trained tokens per row")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--steps", type=int, default=3, help="steps per process (the first is not timed)")
    parser.add_argument("--seq", type=int, default=1030)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--worker-trained", type=int, dest="worker_trained", help=argparse.SUPPRESS)
    add_common_args(parser, repeats=0, warmup=0)
    args = parser.parse_args(argv)
    if args.case:
        args.trained = args.worker_trained
        print(json.dumps(worker(args)))
        return

    shared = [f"--{k}={getattr(args, k)}" for k in ("steps", "seq", "vocab", "hidden", "layers", "device")]
    shared += [f"--threads={args.threads}"] if args.threads else []
    results: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.rounds):  # interleaved: every round runs every case once
        for trained in args.trained:
            for case in CASES:
                command = [sys.executable, __file__, f"--case={case}", f"--worker-trained={trained}", *shared]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results.setdefault((trained, case), []).append(json.loads(out.strip().splitlines()[-1]))

    device = torch.device(args.device)
    machine = _machine(apply_common_args(args)) if device.type == "cpu" else args.device
    cuda = device.type == "cuda"
    print(f"# {machine}; batch 2 x {args.seq} tokens, vocab {args.vocab}, text hidden {args.hidden} x {args.layers}")
    print("| trained / row | loss | median ms | x own | RSS growth MB | x own |" + (" CUDA peak MB | x own |" * cuda))
    print("|---:|---|---:|---:|---:|---:|" + ("---:|---:|" * cuda))
    rows = []
    for trained in args.trained:
        own = {k: statistics.median(r[k] for r in results[(trained, "own")]) for k in results[(trained, "own")][0]}
        for case in CASES:
            med = {k: statistics.median(r[k] for r in results[(trained, case)]) for k in results[(trained, case)][0]}
            line = f"| {trained} | {case} | {med['ms']:.0f} | {med['ms'] / own['ms']:.2f} "
            line += f"| {med['rss_growth_mb']:.0f} | {med['rss_growth_mb'] / own['rss_growth_mb']:.2f} |"
            if cuda:
                line += f" {med['cuda_peak_mb']:.0f} | {med['cuda_peak_mb'] / own['cuda_peak_mb']:.2f} |"
            print(line)
            rows.append({"machine": machine, "trained": trained, "case": case, **med})
    if args.csv:
        append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
