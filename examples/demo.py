"""`make demo`: what each strategy trains on a tiny VLM, then a short fine-tune with the Trainer, all offline.

It runs the logic of ``examples/finetune_vlm.py`` with fewer steps: a random-init tiny Qwen2-VL, a processor built
in code, the synthetic captioning task, VISION_LORA on vision + language + projector, a progress bar, the adapter
saved and reloaded. Run: ``python examples/demo.py [--model-type llava] [--steps 40]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # finetune_vlm.py sits next to this file
from finetune_vlm import build_base, build_parser, finetune, reload_adapter  # noqa: E402

import peft_vision_lora  # noqa: E402
from peft_vision_lora import VisionLoraConfig, print_strategy_report  # noqa: E402
from peft_vision_lora.testing import PROCESSOR_MODEL_TYPES, SyntheticVLMDataset  # noqa: E402

STRATEGIES = {
    "vision+language (ocr, captioning)": {"task": "captioning"},
    "language only (vqa)": {"task": "vqa"},
    "vision only (domain adaptation)": {"task": "domain_adaptation"},
}


def show_strategies(base: torch.nn.Module, rank: int) -> None:
    print_strategy_report(base, r=rank)
    for label, kwargs in STRATEGIES.items():
        model = get_peft_model(copy.deepcopy(base), VisionLoraConfig(r=rank, lora_alpha=rank, **kwargs))
        trainable, total = model.get_nb_trainable_parameters()
        print(f"  {label:<36} trainable {trainable:>7,} of {total:,} ({trainable / total:.2%})")


def main() -> None:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT's
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-type", default="qwen2_vl", choices=PROCESSOR_MODEL_TYPES)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "peft-vision-lora-demo"))
    args = parser.parse_args()

    base = build_base(args.model_type, seed=0)
    print(f"tiny {args.model_type}: {sum(p.numel() for p in base.parameters()):,} parameters")
    print(peft_vision_lora.resolve_components(base).describe())
    show_strategies(base, args.rank)

    print(f"\nfine-tuning on synthetic captioning ({args.steps} steps, vision + language + projector LoRA):")
    train_args = build_parser().parse_args(
        ["--model-type", args.model_type, "--task", "captioning", "--steps", str(args.steps)]
        + ["--rank", str(args.rank), "--output-dir", args.output_dir, "--train-size", str(8 * args.steps)]
    )
    result = finetune(train_args, base=base)
    split = ", ".join(f"{c} {n:,}" for c, n in sorted(result.per_component.items()))
    print(f"trainable per component: {split}")
    print(f"held-out answer accuracy: {result.accuracy:.1%} (exact caption, greedy)")

    batch = result.collator([SyntheticVLMDataset("captioning", size=2, seed=1)[i] for i in range(2)])
    reloaded = reload_adapter(base, args.output_dir)
    result.model.eval()
    with torch.no_grad():
        same = torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    print(f"reloaded adapter reproduces the logits: {same}")
    first, last, out = result.losses[0][1], result.losses[-1][1], args.output_dir
    print(f"demo: loss {first:.3f} -> {last:.3f}, trainable {result.trainable} params, adapter saved to {out}")


if __name__ == "__main__":
    main()
