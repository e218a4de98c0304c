"""`make demo`: adapt a tiny VLM with each strategy, report per-component parameters, and fine-tune it briefly.

Everything is offline: the model is a random-init Qwen2-VL built from a shrunk transformers config and the batches
are synthetic images and token ids. Run: ``python examples/demo.py [--model-type llava] [--steps 40]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import peft_vision_lora
from peft_vision_lora import VisionLoraConfig, print_strategy_report
from peft_vision_lora.tiny_models import build_tiny_vlm, tiny_inputs

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


def fine_tune(base: torch.nn.Module, model_type: str, steps: int, rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    config = VisionLoraConfig(r=rank, lora_alpha=2 * rank, task="captioning", finetune_projector=True)
    model = get_peft_model(copy.deepcopy(base), config)
    peft_vision_lora.explain(model)
    batches = [tiny_inputs(model_type, batch_size=2, seed=s) for s in range(2)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="fine-tune", unit="step")):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    model.save_pretrained(out_dir)

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()
    with torch.no_grad():
        same = torch.allclose(model(**batches[0]).logits, reloaded(**batches[0]).logits, atol=1e-5)
    print(f"reloaded adapter reproduces the logits: {same}")
    trainable, _ = model.get_nb_trainable_parameters()
    print(f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f}, trainable {trainable} params, adapter saved to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-type", default="qwen2_vl", help="a type from peft_vision_lora.tiny_models")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "peft-vision-lora-demo"))
    args = parser.parse_args()

    base = build_tiny_vlm(args.model_type, seed=0)
    print(f"tiny {args.model_type}: {sum(p.numel() for p in base.parameters()):,} parameters")
    print(peft_vision_lora.resolve_components(base).describe())
    show_strategies(base, args.rank)
    fine_tune(base, args.model_type, args.steps, args.rank, args.output_dir)


if __name__ == "__main__":
    main()
