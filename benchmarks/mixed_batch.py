"""Serving many adapters: one mixed batch of 8 rows over 4 adapters vs. 4 single-adapter batches of the same rows.

Four adapters on one tiny VLM (random init, no download): two on vision + projector + language (r 8 and 16), one
vision-only (r 4), one language-only (r 8). The mixed case runs `model(**batch, adapter_names=[...])` once; the
separate case runs `set_adapter(name)` and the 2 rows of that adapter, four times. Both are forward passes (prefill)
in eval mode under `torch.no_grad`; before timing, every mixed row is checked against its single-adapter run.

Timing: cases run round-robin (`--repeats` rounds after `--warmup`), medians reported.

Usage: python benchmarks/mixed_batch.py [--model-type qwen2_vl] [--images-per-row 1] [--repeats 20] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, apply_common_args  # noqa: E402
from lora_linear import _machine, append_csv, time_interleaved  # noqa: E402

from peft_vision_lora import VisionLoraConfig  # noqa: E402
from peft_vision_lora.testing.mixed_batch import MULTI_IMAGE_MODEL_TYPES, multi_image_batch  # noqa: E402
from peft_vision_lora.zoo.tiny import build_tiny_vlm  # noqa: E402

ADAPTERS = {
    "full8": {"r": 8, "finetune_projector": True},
    "full16": {"r": 16, "finetune_projector": True},
    "vision4": {"r": 4, "finetune_language_layers": False, "finetune_projector": False},
    "language8": {"r": 8, "finetune_vision_layers": False, "finetune_projector": False},
}


def build(model_type: str, device: torch.device) -> torch.nn.Module:
    model = None
    for name, options in ADAPTERS.items():
        options = {"finetune_vision_layers": True, "lora_alpha": 16, "init_lora_weights": False, **options}
        if model_type == "gemma3":
            options["finetune_projector"] = False  # no linear in its projector
        config = VisionLoraConfig(**options)
        if model is None:
            model = get_peft_model(build_tiny_vlm(model_type), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="qwen2_vl", choices=MULTI_IMAGE_MODEL_TYPES)
    parser.add_argument("--images-per-row", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64, help="text tokens per row after the images")
    add_common_args(parser, repeats=20, warmup=3)
    args = parser.parse_args(argv)
    device = apply_common_args(args)

    model = build(args.model_type, device)
    names = [name for name in ADAPTERS for _ in range(2)]  # 8 rows, 2 per adapter, grouped like a scheduler would
    batch, singles = multi_image_batch(model, [args.images_per_row] * len(names), seq_len=args.seq)
    batch = {k: v.to(device) for k, v in batch.items()}
    groups = {name: _rows([singles[i] for i, n in enumerate(names) if n == name], device) for name in ADAPTERS}

    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        for name, sub in groups.items():
            model.set_adapter(name)
            expected = model(**sub).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], expected, rtol=1e-4, atol=1e-4)

    def run_mixed() -> None:
        with torch.no_grad():
            model(**batch, adapter_names=names)

    def run_separate() -> None:
        with torch.no_grad():
            for name, sub in groups.items():
                model.set_adapter(name)
                model(**sub)

    times = time_interleaved({"mixed": run_mixed, "separate": run_separate}, args.warmup, args.repeats, device)
    medians = {case: statistics.median(values) for case, values in times.items()}
    ratio = medians["separate"] / medians["mixed"]
    machine = _machine(device)
    print(f"{args.model_type}, 8 rows x {args.images_per_row} image(s), 4 adapters, {machine}")
    for case, value in medians.items():
        print(f"  {case:9s} {value:8.2f} ms  ({8 / value * 1e3:7.1f} rows/s)")
    print(f"  throughput mixed / separate: {ratio:.2f}x")
    if args.csv:
        append_csv(
            args.csv,
            [
                {
                    "bench": "mixed_batch",
                    "model_type": args.model_type,
                    "case": c,
                    "ms": round(v, 3),
                    "machine": machine,
                }
                for c, v in medians.items()
            ],
        )


def _rows(singles: list[dict], device: torch.device) -> dict:
    """One batch of these single-row batches: every input (ids, pixels, grids) stacks along dim 0."""
    return {key: torch.cat([single[key] for single in singles]).to(device) for key in singles[0]}


if __name__ == "__main__":
    main()
