"""Image resolution vs. image tokens, activation memory and step time: what ``processor_kwargs`` buys.

For each pixel budget, one batch of chats with one image each goes through :class:`VisionChatCollator` with
``processor_kwargs={"size": {"shortest_edge": ..., "longest_edge": budget}}`` (Qwen2-VL's pixel range) and a
forward + backward of a VISION_LORA-wrapped Qwen2-VL. Reported per budget: image tokens per image, sequence length,
the bytes of tensors autograd saves for backward (activation memory: exact and machine-independent, unlike a CPU
peak), and the median step time. Cases are interleaved round by round, so machine noise spreads over all of them.

    python benchmarks/resolution_memory.py --budgets 1024 4096 16384 --image-side 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import add_common_args, apply_common_args
from peft import get_peft_model
from PIL import Image

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.data import VisionChatCollator
from peft_vision_lora.testing import build_processor
from peft_vision_lora.zoo.tiny import build_tiny_vlm


def saved_tensor_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (shared storages counted once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def make_batch(collator: VisionChatCollator, side: int, batch_size: int) -> dict[str, torch.Tensor]:
    image = Image.new("RGB", (side, side), (180, 40, 40))
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "a red square on a white background"},
    ]
    return collator([{"images": [image], "messages": chat}] * batch_size)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096, 16384], help="max pixels per image")
    parser.add_argument("--image-side", type=int, default=256, help="side of the (square) input images")
    parser.add_argument("--batch-size", type=int, default=2)
    add_common_args(parser, repeats=5, warmup=1)
    args = parser.parse_args(argv)
    device = apply_common_args(args)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_vlm("qwen2_vl", seed=0), VisionLoraConfig(r=8, task="captioning")).to(device)
    processor = build_processor("qwen2_vl")
    token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    cases = {}
    for budget in args.budgets:
        size = {"shortest_edge": min(budget, 16 * 16), "longest_edge": budget}
        collator = VisionChatCollator(processor, processor_kwargs={"size": size})
        batch = make_batch(collator, args.image_side, args.batch_size)
        cases[budget] = {k: v.to(device) for k, v in batch.items()}
    times: dict[int, list[float]] = {budget: [] for budget in cases}
    for round_ in range(args.warmup + args.repeats):
        for budget, batch in cases.items():  # interleaved: every case sees the same noise
            start = time.perf_counter()
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            if round_ >= args.warmup:
                times[budget].append(time.perf_counter() - start)
    rows = []
    print(f"{'max pixels':>10} {'img tokens':>10} {'seq len':>8} {'saved MiB':>10} {'step ms':>9}")
    for budget, batch in cases.items():
        row = {
            "max_pixels": budget,
            "image_tokens": int((batch["input_ids"][0] == token).sum()),
            "seq_len": batch["input_ids"].shape[1],
            "saved_mib": saved_tensor_bytes(model, batch) / 2**20,
            "step_ms": 1e3 * statistics.median(times[budget]),
        }
        rows.append(row)
        print(
            f"{budget:>10} {row['image_tokens']:>10} {row['seq_len']:>8} {row['saved_mib']:>10.2f} "
            f"{row['step_ms']:>9.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
