"""Training-step time and peak memory of a small VLM: VisionLoraConfig vs. PEFT's LoRA on the same modules.

The model is a LLaVA built from a shrunk config (hidden 256, 4 layers on each side, random init, no download).
Both adapters target exactly the same linears (PEFT's LoRA is told the names our flags resolved to) with the same
rank, alpha and dropout, and start from identical weights. One step = forward, backward, AdamW step.

Timing: cases run round-robin (`--repeats` rounds after `--warmup`), medians reported, so drift and a busy
neighbour hit every case alike. Peak memory: tensor storage allocated during one step (see lora_linear.py), or
`torch.cuda.max_memory_allocated` on CUDA.

Usage: python benchmarks/train_step.py [--dropout 0.05] [--batch 4] [--seq 256] [--repeats 15] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args  # noqa: E402
from lora_linear import _machine, _peak_mb, append_csv, time_interleaved  # noqa: E402

from peft_vision_lora import VisionLoraConfig  # noqa: E402
from peft_vision_lora.kernels import TRITON_AVAILABLE  # noqa: E402
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs  # noqa: E402

WIDTH, LAYERS = 256, 4


def small_vlm(device: torch.device) -> torch.nn.Module:
    tower = {"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS}
    text = {**tower, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": WIDTH // 4}
    vision = {**tower, "num_attention_heads": 4}
    return build_tiny_vlm("llava", seed=0, text_config=text, vision_config=vision).to(device)


def make_cases(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    base = small_vlm(device)
    rank = args.rank
    kernels = ["torch"] + (["triton"] if device.type == "cuda" and TRITON_AVAILABLE else [])
    cases: dict[str, torch.nn.Module] = {}
    for kernel in kernels:
        config = VisionLoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=args.dropout, init_lora_weights="gaussian", kernel=kernel
        )
        cases[f"ours-{kernel}"] = get_peft_model(copy.deepcopy(base), config)
    first = next(iter(cases.values()))
    targets = sorted(first.base_model.targeted_module_names)
    peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=args.dropout, target_modules=targets)
    cases = {"peft-lora": get_peft_model(copy.deepcopy(base), peft_config), **cases}
    weights = get_peft_model_state_dict(first)
    for model in cases.values():
        set_peft_model_state_dict(model, weights)
        model.train()
    return cases


def step_fn(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="text tokens per row (image tokens come on top)")
    add_common_args(parser, repeats=15, warmup=2)
    args = parser.parse_args(argv)
    device = apply_common_args(args)
    torch.manual_seed(0)
    cases = make_cases(args, device)
    batch = tiny_inputs(next(iter(cases.values())), batch_size=args.batch, seq_len=args.seq, seed=0)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    steps = {name: step_fn(model, batch) for name, model in cases.items()}
    times = time_interleaved(steps, args.warmup, args.repeats, device)
    rows = [
        {
            "machine": _machine(device),
            "model": f"llava hidden {WIDTH}, {LAYERS}+{LAYERS} layers",
            "batch": f"{args.batch}x{batch['input_ids'].shape[1]}",
            "dropout": args.dropout,
            "case": name,
            "median_ms": statistics.median(times[name]),
            "peak_mb": _peak_mb(step, device),
        }
        for name, step in steps.items()
    ]
    reference = rows[0]
    print(f"\n{rows[0]['model']}, batch {rows[0]['batch']} tokens, r={args.rank}, dropout={args.dropout}")
    print(f"{'case':<13}{'median ms':>11}{'x peft':>8}{'peak MB':>10}{'mem x peft':>12}")
    for row in rows:
        print(
            f"{row['case']:<13}{row['median_ms']:>11.1f}{row['median_ms'] / reference['median_ms']:>8.3f}"
            f"{row['peak_mb']:>10.1f}{row['peak_mb'] / max(reference['peak_mb'], 1e-9):>12.3f}"
        )
    if args.csv:
        append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
