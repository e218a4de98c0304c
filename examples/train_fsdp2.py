"""Train a VisionLoraConfig adapter on a VLM sharded with FSDP2, through accelerate.

    accelerate launch --config_file examples/fsdp2_cpu.yaml examples/train_fsdp2.py --output-dir runs/fsdp2

Without --model it trains a tiny random-init LLaVA on a fixed synthetic batch per process (the test setup); with
--model PATH it loads that checkpoint instead. The vision and language blocks become FSDP units
(`fsdp_block_class_names`), only LoRA weights train, and the adapter is saved gathered: one ordinary PEFT adapter
that loads on a single process. The main process also writes `summary.json` and the sharded model's eval logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForImageTextToText

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.integrations.sharding import enable_fsdp_on_cpu, save_gathered_adapter, set_vlm_wrap_policy
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

EVAL_SEED = 12345


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--model", default=None, help="a saved VLM to load; default: a tiny random-init one")
    parser.add_argument("--model-type", default="llava", help="tiny model type when --model is not given")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--r", type=int, default=8)
    return parser.parse_args()


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model is None:
        return build_tiny_vlm(args.model_type, seed=0)  # every rank builds the same weights
    return AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    enable_fsdp_on_cpu(accelerator)
    if not accelerator.is_fsdp2:
        raise SystemExit(
            "This script expects an FSDP2 launch: accelerate launch --config_file examples/fsdp2_cpu.yaml "
            f"examples/train_fsdp2.py ... (got distributed_type={accelerator.distributed_type})."
        )

    config = VisionLoraConfig(r=args.r, lora_alpha=2 * args.r, finetune_projector=True)
    model = get_peft_model(load_model(args), config)
    wrapped = set_vlm_wrap_policy(accelerator, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2: fully_shard per block, then the root

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen_lora = [name for name, p in model.named_parameters() if "lora_" in name and not p.requires_grad]
    # one fixed batch per process: a tiny data-parallel "dataset" the adapter can fit
    batch = tiny_inputs(model, batch_size=2, seed=accelerator.process_index)
    losses = []
    model.train()
    for _ in range(args.steps):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    model.eval()
    with torch.no_grad():
        logits = model(**tiny_inputs(model, batch_size=2, seed=EVAL_SEED)).logits
        with model.disable_adapter():  # the frozen base through the same sharded forward
            base_logits = model(**tiny_inputs(model, batch_size=2, seed=EVAL_SEED)).logits
    save_gathered_adapter(model, args.output_dir / "adapter", accelerator.is_main_process)

    fsdp_units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    local, full = 0, 0
    for p in model.parameters():
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        full += p.numel()
    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(logits.cpu(), args.output_dir / "sharded_logits.pt")
        torch.save(base_logits.cpu(), args.output_dir / "base_logits.pt")
        summary = {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "wrapped_block_classes": wrapped,
            "fsdp_units": fsdp_units,
            "trainable": trainable,
            "frozen_lora": frozen_lora,
            "local_params": local,
            "full_params": full,
            "losses": losses,
        }
        (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        accelerator.print(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}; adapter in {args.output_dir / 'adapter'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
