"""Train the same tiny VLM with each VISION_LORA strategy on the task it is meant for, and compare.

1. "Pretrain" a random-init tiny VLM (full fine-tuning) on synthetic captioning, standing in for a pretrained
   checkpoint: its vision tower learns colours and shapes, its language model the caption format.
2. Adapt it with LoRA, each task with its strategy (TASK_STRATEGY): captioning and OCR with vision + language,
   VQA with the language model only (the images are the ones it knows, the questions are new), domain adaptation
   with the vision tower only (the captions are the ones it knows, the colours are shifted). VQA and domain
   adaptation are also trained with vision + language LoRA, to show what the smaller strategy costs (skip those
   reference runs with --no-reference).
3. Write a loss-curve plot (PNG), a markdown table (trainable parameters, peak memory, final loss, held-out answer
   accuracy before -> after) and the raw numbers (JSON).

Each run is a fresh process so that its peak memory is its own.

    python examples/compare_strategies.py --output-dir /tmp/strategies
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # finetune_vlm.py sits next to this file
from finetune_vlm import EVAL_SEED, answer_accuracy, build_base, build_parser, finetune  # noqa: E402

from peft_vision_lora.data import VisionChatCollator  # noqa: E402
from peft_vision_lora.testing import TASK_STRATEGY, SyntheticVLMDataset, build_processor  # noqa: E402

REFERENCE_TASKS = ("vqa", "domain_adaptation")  # tasks whose strategy is a subset of vision + language


def pretrain(model: torch.nn.Module, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Full fine-tuning on plain captioning plus text-only rows: the stand-in for a pretrained checkpoint.

    The text-only rows ("Repeat: yellow 47") let the language model meet every answer word without an image, as a
    real one has seen its whole vocabulary; otherwise words never used as targets stay unreachable for adapters
    under a frozen output head.
    """
    collator = VisionChatCollator(build_processor(model))
    data = SyntheticVLMDataset("captioning", size=steps * batch_size, seed=seed + 1, text_only_fraction=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    # tqdm only on a terminal; plain log lines otherwise
    on_terminal = sys.stderr.isatty()
    for step in (bar := tqdm(range(steps), desc="pretrain (full fine-tuning)", unit="step", disable=not on_terminal)):
        batch = collator([data[step * batch_size + i] for i in range(batch_size)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if not on_terminal and (step + 1) % max(1, steps // 10) == 0:
            print(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    return losses


class PeakRSS:
    """Samples this process's resident memory every few milliseconds (CPU has no allocator peak counter)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One LoRA run in a fresh process: load the pretrained base, train, measure."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(job["threads"])
    base = AutoModelForImageTextToText.from_pretrained(job["base_dir"], dtype=torch.float32)
    args = build_parser().parse_args(job["argv"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with PeakRSS() as memory:
        result = finetune(args, base=base)
    elapsed = time.perf_counter() - started
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "losses": result.losses,
        "trainable": result.trainable,
        "per_component": result.per_component,
        "accuracy": result.accuracy,
        "peak_rss_mb": memory.peak / 2**20,
        "training_rss_mb": (memory.peak - memory.start) / 2**20,
        "cuda_peak_mb": cuda_peak,
        "seconds": elapsed,
    }


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over ``window`` steps: single batches are noisy."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(runs: list[dict[str, Any]], pretrain_losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    left.plot(range(1, len(pretrain_losses) + 1), moving_average(pretrain_losses), color="gray")
    left.set(title="1. pretraining stand-in (full fine-tuning)", xlabel="step", ylabel="loss", yscale="log")
    for run in runs:
        steps, losses = zip(*run["losses"])
        style = "--" if run["reference"] else "-"
        label = f"{run['task']}: {run['strategy']} ({run['trainable']:,} params)"
        right.plot(steps, moving_average(list(losses)), style, label=label)
    right.set(title="2. LoRA adaptation per task and strategy (10-step average)", xlabel="step", ylabel="loss")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(runs: list[dict[str, Any]], base_params: int) -> str:
    lines = [
        "| task | strategy | trainable params | % of model | peak RSS (MB) | training RSS (MB) | final loss "
        "| held-out accuracy before -> after | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        final = sum(loss for _, loss in run["losses"][-10:]) / len(run["losses"][-10:])
        lines.append(
            f"| {run['task']} | {run['strategy']}{' (reference)' if run['reference'] else ''} "
            f"| {run['trainable']:,} | {run['trainable'] / base_params:.1%} | {run['peak_rss_mb']:.0f} "
            f"| {run['training_rss_mb']:.1f} | {final:.3f} | {run['accuracy_before']:.1%} -> {run['accuracy']:.1%} "
            f"| {run['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="qwen2_vl", help="tiny model to build (a transformers model_type)")
    parser.add_argument(
        "--text-hidden", type=int, default=128, help="language model width (the tiny default, 32, is too narrow)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="full fine-tuning steps before LoRA")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="learning rate of the pretraining")
    parser.add_argument("--steps", type=int, default=300, help="LoRA steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--eval-size", type=int, default=128, help="held-out examples per accuracy figure")
    parser.add_argument("--no-reference", action="store_true", help="skip the vision+language reference runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and initialisation")
    parser.add_argument(
        "--output-dir",
        default=os.path.join(tempfile.gettempdir(), "peft-vision-lora-strategies"),
        help="where the plot, table and JSON go",
    )
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    threads = torch.get_num_threads()

    torch.manual_seed(args.seed)
    # full pretraining trains the head too: no re-drawn head
    base = build_base(args.model_type, seed=args.seed, head_std=0.0, text_hidden=args.text_hidden)
    pretrain_losses = pretrain(base, args.pretrain_steps, args.batch_size, args.pretrain_lr, args.seed)
    base.eval()
    base_dir = os.path.join(args.output_dir, "pretrained-base")
    base.save_pretrained(base_dir)
    base_params = sum(p.numel() for p in base.parameters())
    collator = VisionChatCollator(build_processor(base))

    jobs = [(task, TASK_STRATEGY[task], False) for task in TASK_STRATEGY]
    if not args.no_reference:
        jobs += [(task, "vision+language", True) for task in REFERENCE_TASKS]
    runs = []
    for task, strategy, reference in jobs:
        held_out = SyntheticVLMDataset(task, size=args.eval_size, seed=EVAL_SEED + args.seed)
        before = answer_accuracy(base, collator, held_out)
        out = os.path.join(args.output_dir, f"{task}-{strategy}")
        argv = [
            "--model-type", args.model_type, "--task", task, "--strategy", strategy,
            "--finetune-projector", "false", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--train-size", str(args.steps * args.batch_size), "--lr", str(args.lr), "--rank", str(args.rank),
            "--eval-size", str(args.eval_size), "--seed", str(args.seed), "--output-dir", out, "--quiet",
        ]  # fmt: skip
        print(f"{task} with {strategy} LoRA ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            run = pool.submit(_run_one, {"base_dir": base_dir, "argv": argv, "threads": threads}).result()
        run.update(task=task, strategy=strategy, reference=reference, accuracy_before=before)
        print(f"  held-out accuracy {before:.1%} -> {run['accuracy']:.1%}, {run['trainable']:,} trainable", flush=True)
        runs.append(run)

    plot_path = os.path.join(args.output_dir, "compare_strategies.png")
    plot(runs, pretrain_losses, plot_path)
    markdown = table(runs, base_params)
    with open(os.path.join(args.output_dir, "compare_strategies.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.output_dir, "compare_strategies.json"), "w") as f:
        json.dump(
            {"args": vars(args), "base_params": base_params, "pretrain_losses": pretrain_losses, "runs": runs}, f
        )
    print(f"\n{args.model_type}, {base_params:,} parameters; pretraining loss {pretrain_losses[0]:.3f} -> "
          f"{pretrain_losses[-1]:.3f} in {args.pretrain_steps} steps\n")  # fmt: skip
    print(markdown)
    print(f"\nplot: {plot_path}")


if __name__ == "__main__":
    main()
