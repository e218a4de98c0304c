"""Fine-tune a VLM with VISION_LORA through the Hugging Face Trainer: your checkpoint and data, or offline tiny ones.

Your own model and data: a checkpoint folder (``from_pretrained``-able model and processor) and a JSONL/JSON/CSV/
Parquet file or imagefolder in any format ``load_chat_dataset`` reads (chat messages with image parts, LLaVA/ShareGPT
``conversations``, or flat image/question/answer columns):

    python examples/finetune_vlm.py --model ./my-qwen2-vl --data train.jsonl --image-root ./images --steps 500 \
        --max-pixels 200704 --max-length 1024 --output-dir ./adapter

Without ``--model`` / ``--data`` it trains a tiny random-init VLM on a synthetic task, offline:

    python examples/finetune_vlm.py --model-type qwen2_vl --task captioning --steps 60 --output-dir /tmp/vlm
    python examples/finetune_vlm.py --task vqa --component-lr language=2e-3 --gradient-checkpointing
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/finetune_vlm.py --text-only-fraction 0.5

The task picks the strategy (``VisionLoraConfig(task=...)``, also with ``--data``; ``--strategy`` names one):
captioning and OCR train vision + language, VQA the language model only, domain adaptation the vision tower only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.data import VisionChatCollator, load_chat_dataset, load_processor
from peft_vision_lora.data.collator import IGNORE_INDEX
from peft_vision_lora.integrations.training import VisionLoraTrainer, enable_gradient_checkpointing
from peft_vision_lora.reports.strategies import STRATEGIES
from peft_vision_lora.testing import TASKS, SyntheticVLMDataset, build_processor
from peft_vision_lora.zoo.tiny import build_tiny_vlm

EVAL_SEED = 10_000  # held-out examples come from another seed: unseen images (and, for OCR, unseen renderings)


class LossInProgressBar(ProgressCallback):
    """The Trainer's progress bar with the running loss in its postfix instead of one printed dict per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


class PlainLogLines(TrainerCallback):
    """Off a terminal (CI, a log file, a notebook's captured output) one plain line per log instead of a bar, as
    transformers itself prints when tqdm is disabled, but short: step, loss, learning rate."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            lr = logs.get("learning_rate")
            print(
                f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}" + (f" lr {lr:.2e}" if lr else "")
            )


class LossRecorder(TrainerCallback):
    """Keeps (step, loss) of every logged training step."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


class CountingCollator:
    """Wraps a collator and counts batches without any image (where the vision adapters sit out the step)."""

    def __init__(self, collator: VisionChatCollator) -> None:
        self.collator, self.batches, self.text_only_batches = collator, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.batches += 1
        self.text_only_batches += not any(example.get("images") for example in examples)
        return self.collator(examples)


@dataclass
class Result:
    losses: list[tuple[int, float]]
    trainable: int
    per_component: dict[str, int]
    output_dir: str
    accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: PeftModel | None = field(default=None, repr=False)
    collator: VisionChatCollator | None = field(default=None, repr=False)


def parse_component_lr(items: list[str]) -> dict[str, float]:
    """``["vision=1e-4", "projector=5e-4"]`` -> ``{"vision": 1e-4, "projector": 5e-4}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--component-lr takes COMPONENT=LR pairs, got {item!r}")
        out[name] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (model and processor)")
    parser.add_argument("--data", default=None, help="your data: .jsonl/.json/.csv/.parquet file or imagefolder")
    parser.add_argument("--image-root", default=None, help="folder relative image paths start at (default: --data's)")
    parser.add_argument("--data-format", choices=["messages", "sharegpt", "flat"], default=None, help="(detected)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row; longer rows are cut or dropped")
    parser.add_argument("--max-pixels", type=int, default=None, help="image resolution cap (Qwen2-VL family)")
    parser.add_argument(
        "--processor-kwargs",
        type=json.loads,
        default=None,
        help="JSON passed to the processor, e.g. '{\"size\": ...}'",
    )
    parser.add_argument("--model-type", default="qwen2_vl", help="tiny model type with an offline processor")
    parser.add_argument("--task", default="captioning", choices=TASKS, help="synthetic task = strategy preset")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "peft-vision-lora-finetune"))
    parser.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default=None,
        help="override the task's strategy, e.g. train captioning data with language-only LoRA",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of components without their own")
    parser.add_argument("--component-lr", nargs="*", default=[], metavar="COMPONENT=LR")
    parser.add_argument("--finetune-projector", choices=["false", "true", "full"], default="true")
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=64, help="held-out examples for accuracy (0: skip)")
    parser.add_argument("--text-only-fraction", type=float, default=0.0)
    parser.add_argument("--max-images", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the end)")
    parser.add_argument("--resume-from-checkpoint", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-hidden", type=int, default=None, help="widen the tiny language model (Qwen2-VL)")
    parser.add_argument(
        "--ddp-find-unused-parameters",
        choices=["true", "false"],
        default="true",
        help="DDP only: 'false' crashes on text-only batches (kept to show why the default is 'true')",
    )
    parser.add_argument(
        "--head-std", type=float, default=0.3, help="re-draw the tiny model's output head with this std (0: keep)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the default when stderr is not a terminal)"
    )
    parser.add_argument("--quiet", action="store_true", help="only the final summary line")
    return parser


def make_config(args: argparse.Namespace) -> VisionLoraConfig:
    projector = {"false": False, "true": True, "full": "full"}[args.finetune_projector]
    # The task preset picks the components (TASK_PRESETS); --strategy names them directly instead.
    components = STRATEGIES[args.strategy] if args.strategy else {"task": args.task}
    return VisionLoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=args.lora_dropout,
        finetune_projector=projector,
        **components,
    )


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by `accelerate launch` / torchrun
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, args.steps // 10),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        # tqdm only on a terminal; plain log lines otherwise (PlainLogLines)
        disable_tqdm=args.no_progress or args.quiet or not sys.stderr.isatty(),
        # Text-only batches leave the vision adapters out of the graph on that rank: DDP must be told to look for
        # unused parameters or it fails with "Expected to have finished reduction in the prior iteration".
        ddp_find_unused_parameters=args.ddp_find_unused_parameters == "true",
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, collator: VisionChatCollator, dataset, batch_size: int = 16) -> float:
    """Share of examples whose whole answer (end-of-turn token included) is the model's argmax at every position.

    Teacher-forced, but exact: if every answer token is the argmax given the correct prefix, greedy decoding
    produces exactly that answer.
    """
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = target != IGNORE_INDEX
        correct += int(((predicted == target) | ~scored).all(dim=1).sum())
    model.train(was_training)
    return correct / len(dataset)


def per_component_trainable(model: torch.nn.Module) -> dict[str, int]:
    from peft_vision_lora.integrations.training import parameter_components

    sizes = dict(model.named_parameters())
    out: dict[str, int] = {}
    for name, component in parameter_components(model).items():
        out[component] = out.get(component, 0) + sizes[name].numel()
    return out


def wide_text_overrides(model_type: str, hidden: int) -> dict[str, Any]:
    """Config overrides that widen the tiny language model to ``hidden`` (Qwen2-VL family only)."""
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"--text-hidden is implemented for qwen2_vl and qwen2_5_vl, not {model_type!r}")
    if hidden % 32:
        raise ValueError(f"--text-hidden must be a multiple of 32 (4 heads, M-RoPE sections), got {hidden}")
    half = hidden // 8  # head_dim // 2 = hidden / 4 / 2: the M-RoPE sections must add up to it
    sections = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections}
    text = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "head_dim": hidden // 4, "rope_parameters": rope}
    return {"text_config": text, "vision_config": {"hidden_size": hidden}}  # the merger's output width


def build_base(model_type: str, seed: int = 0, head_std: float = 0.3, text_hidden: int | None = None):
    """The model to adapt; with a real checkpoint this is ``AutoModelForImageTextToText.from_pretrained(...)``.

    A random-init tiny model has a 0.02-std output head on a 32-wide hidden state: its logits stay within about
    +-0.6, so nothing trained below a frozen head can make a confident prediction (the loss floor is about
    ln(512) - 0.6 = 5.6). Trained checkpoints have heads that can; ``head_std`` re-draws the head so that the
    adapters, not the head, decide how far the loss goes. ``text_hidden`` widens the language model: 32 dimensions
    are too few for a frozen head to tell a dozen one-word answers apart.
    """
    overrides = wide_text_overrides(model_type, text_hidden) if text_hidden else {}
    model = build_tiny_vlm(model_type, seed=seed, **overrides)
    if head_std:
        generator = torch.Generator().manual_seed(seed)
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head.copy_(torch.randn(head.shape, generator=generator) * head_std)
    return model


def processor_kwargs(args: argparse.Namespace, processor: Any) -> dict[str, Any]:
    """What the collator passes to every processor call: the image resolution, mostly (docs/training.md)."""
    kwargs = dict(args.processor_kwargs or {})
    if args.max_pixels:
        image_processor = processor.image_processor
        size = getattr(image_processor, "size", None)
        if not hasattr(image_processor, "merge_size") or getattr(size, "longest_edge", None) is None:
            raise ValueError(
                "--max-pixels sets the pixel budget of Qwen2-VL-style image processors; "
                f"{type(image_processor).__name__} has fixed sizes: pass --processor-kwargs '{{\"size\": ...}}'."
            )
        # Qwen2-VL's size is a pixel range: shortest_edge = min_pixels, longest_edge = max_pixels
        kwargs["size"] = {"shortest_edge": min(size.shortest_edge, args.max_pixels), "longest_edge": args.max_pixels}
    return kwargs


def finetune(args: argparse.Namespace, base: torch.nn.Module | None = None) -> Result:
    """Build (or take) the VLM, wrap it with VISION_LORA, train with the Trainer, save the adapter."""
    if base is not None:
        base = copy.deepcopy(base)
    elif args.model:
        from transformers import AutoModelForImageTextToText

        base = AutoModelForImageTextToText.from_pretrained(args.model)
    else:
        base = build_base(args.model_type, args.seed, args.head_std, args.text_hidden)
    processor = load_processor(args.model) if args.model else build_processor(base)
    collator = CountingCollator(
        VisionChatCollator(
            processor, model=base, max_length=args.max_length, processor_kwargs=processor_kwargs(args, processor)
        )
    )
    if args.data:
        train = load_chat_dataset(args.data, image_root=args.image_root, format=args.data_format)
    else:
        train = SyntheticVLMDataset(
            args.task,
            size=args.train_size,
            seed=args.seed,
            text_only_fraction=args.text_only_fraction,
            max_images=args.max_images,
        )
    torch.manual_seed(args.seed)  # LoRA init
    model = get_peft_model(base, make_config(args))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    recorder = LossRecorder()
    trainer = VisionLoraTrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=train,
        data_collator=collator,
        component_lr=parse_component_lr(args.component_lr) or None,
        callbacks=[recorder],
    )
    trainer.remove_callback(PrinterCallback)  # one printed dict per step otherwise
    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossInProgressBar)
    elif not args.quiet:
        trainer.add_callback(PlainLogLines)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # the adapter only (plus a fully trained projector with "full")
    accuracy = None
    if args.eval_size and not args.data and trainer.is_world_process_zero():  # synthetic tasks only
        held_out = SyntheticVLMDataset(args.task, size=args.eval_size, seed=EVAL_SEED + args.seed)
        accuracy = answer_accuracy(trainer.model, collator.collator, held_out)
    trainable, _ = model.get_nb_trainable_parameters()
    batches = {"batches": collator.batches, "text_only_batches": collator.text_only_batches}
    if trainer.args.world_size > 1:  # each rank reports what it saw (the DDP test reads these)
        with open(os.path.join(args.output_dir, f"batches_rank{trainer.args.process_index}.json"), "w") as f:
            json.dump(batches, f)
    components = per_component_trainable(model)
    return Result(recorder.losses, trainable, components, args.output_dir, accuracy, batches, model, collator.collator)


def reload_adapter(base: torch.nn.Module, adapter_dir: str) -> PeftModel:
    """The saved adapter on a copy of the base model, ready for inference."""
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()


def main(argv: list[str] | None = None) -> Result:
    args = build_parser().parse_args(argv)
    result = finetune(args)
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = result.losses[0][1], result.losses[-1][1]
        if not args.quiet:
            split = ", ".join(f"{c} {n:,}" for c, n in sorted(result.per_component.items()))
            print(f"trainable per component: {split}")
            if result.accuracy is not None:
                print(f"held-out answer accuracy ({args.task}): {result.accuracy:.1%}")
        summary = {"first_loss": first, "last_loss": last, "trainable": result.trainable, "accuracy": result.accuracy}
        with open(os.path.join(args.output_dir, "finetune_summary.json"), "w") as f:
            json.dump({**summary, "losses": result.losses, "per_component": result.per_component}, f, indent=1)
        out = args.output_dir
        print(f"finetune: loss {first:.3f} -> {last:.3f}, trainable {result.trainable} params, saved to {out}")
    return result


if __name__ == "__main__":
    main()
