"""Batches whose rows hold different numbers of images (several, one, none), for mixed-adapter tests and benchmarks.

`multi_image_batch(model, [2, 0, 1])` builds one batch of equal-length rows (no padding, so each row's logits do not
depend on the others) and, for each row, the batch of that row alone: the reference a mixed-adapter run must match.
Images come from `tiny_inputs`, so every family lays out its pixels as its own processor would; LLaVA-Next images
take turns over three sizes (square, tall, wide), so rows hold different numbers of crops and placeholders, and each
image's placeholder count is read from the model's own feature packing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..zoo.tiny import IMAGE_TOKEN, tiny_inputs

__all__ = ["MULTI_IMAGE_MODEL_TYPES", "multi_image_batch"]

# pixel_values concatenated over all images of the batch (dim 0), with these per-image side inputs
_CONCAT_EXTRAS = {
    "llava": (),
    "paligemma": (),
    "gemma3": (),
    "internvl": (),
    "blip-2": (),
    "kosmos-2": (),
    "video_llava": ("pixel_values_videos",),  # each image block holds one image and one video
    "llava_next": ("image_sizes",),
    "mistral3": ("image_sizes",),
    "qwen2_vl": ("image_grid_thw",),
    "qwen2_5_vl": ("image_grid_thw",),
}
_PADDED = ("idefics3", "smolvlm", "mllama")  # pixel_values (batch, images, ...): padding images per row
MULTI_IMAGE_MODEL_TYPES: tuple[str, ...] = tuple(sorted((*_CONCAT_EXTRAS, *_PADDED)))
Batch = dict[str, Any]


def _per_image(family: str, ref: Batch, count: int) -> list[Batch]:
    """Split `tiny_inputs`' image tensors into one dict per image."""
    if family.startswith("qwen"):
        patches = ref["image_grid_thw"].prod(dim=-1).tolist()
        chunks = ref["pixel_values"].split(patches)
        return [{"pixel_values": chunks[k], "image_grid_thw": ref["image_grid_thw"][k : k + 1]} for k in range(count)]
    keys = ("pixel_values", *_CONCAT_EXTRAS.get(family, ()))
    if family in _PADDED:
        keys = tuple(
            k for k in ("pixel_values", "pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask") if k in ref
        )
    return [{key: ref[key][k : k + 1] for key in keys} for k in range(count)]


# LLaVA-Next image sizes (H, W), in turn: one, two and two crops plus the base image, different unpadded grids
LLAVA_NEXT_SIZES = ((32, 32), (32, 64), (48, 24))


def _llava_next_images(model: Any, count: int, seed: int) -> tuple[list[Batch], list[int]]:
    """`count` images of `LLAVA_NEXT_SIZES` in turn, and each one's placeholder count as the model packs it."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    side = config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    images, tokens = [], []
    most = max(image_size_to_num_patches(size, config.image_grid_pinpoints, side) for size in LLAVA_NEXT_SIZES)
    for k in range(count):
        size = torch.tensor([LLAVA_NEXT_SIZES[k % len(LLAVA_NEXT_SIZES)]])
        pixels = torch.randn(1, most, 3, side, side, generator=gen)  # crops past the image's own are padding
        images.append({"pixel_values": pixels, "image_sizes": size})
        with torch.no_grad():
            packed = model.get_image_features(pixel_values=pixels, image_sizes=size).pooler_output
        tokens.append(packed[0].shape[0])
    return images, tokens


def _token_fields(family: str, config: Any, input_ids: torch.Tensor, batch: Batch) -> None:
    is_image = input_ids == getattr(config, "image_token_id", IMAGE_TOKEN)  # Kosmos-2 has no id in its config
    if family.startswith("qwen"):
        batch["mm_token_type_ids"] = is_image.int()
    elif family == "gemma3":
        batch["token_type_ids"] = is_image.long()
    elif family == "paligemma":
        batch["token_type_ids"] = (~is_image).long()
    elif family == "kosmos-2":
        batch["image_embeds_position_mask"] = is_image.long()


def _padded_pixels(family: str, rows: list[list[Batch]], most: int, length: int) -> Batch:
    """(batch, most, ...) tensors, zero (padding) where a row has fewer images; Mllama's masks follow."""
    out: Batch = {}
    template = next(image for row in rows for image in row)
    for key, value in template.items():
        slots = []
        for row in rows:
            images = [image[key][0, 0] for image in row]
            images += [torch.zeros_like(value[0, 0])] * (most - len(row))
            slots.append(torch.stack(images))
        out[key] = torch.stack(slots)  # (batch, most, ...)
    if family == "mllama":
        tiles = template["pixel_values"].shape[2]
        cross = torch.zeros(len(rows), length, most, tiles, dtype=torch.long)
        for b, row in enumerate(rows):
            cross[b, :, : len(row), 0] = 1  # every token sees the first tile of each of its row's images
        out["cross_attention_mask"] = cross
    return out


def multi_image_batch(
    model: Any, images_per_row: Sequence[int], seq_len: int = 6, seed: int = 0
) -> tuple[Batch, list[Batch]]:
    """(batch, [batch of row 0 alone, ...]): row i holds `images_per_row[i]` image blocks, then random text."""
    config = model.config
    family = config.model_type
    if family not in MULTI_IMAGE_MODEL_TYPES:
        raise ValueError(f"No multi-image batch for {family!r}; supported: {', '.join(MULTI_IMAGE_MODEL_TYPES)}")
    total = sum(images_per_row)
    ref = tiny_inputs(model, batch_size=max(total, 1), seq_len=seq_len, seed=seed)
    block = ref["input_ids"][0, : ref["input_ids"].shape[1] - seq_len]
    if family == "llava_next":
        images, tokens = _llava_next_images(model, total, seed)
        blocks = [torch.full((count,), int(block[0])) for count in tokens]  # image blocks differ in length
    else:
        images, blocks = _per_image(family, ref, total), [block] * total
    row_blocks, taken = [], 0
    for count in images_per_row:
        row_blocks.append(blocks[taken : taken + count])
        taken += count
    length = max(sum(len(b) for b in row) for row in row_blocks) + seq_len
    gen = torch.Generator().manual_seed(seed + 1)

    rows_ids, rows_images, taken = [], [], 0
    for count, row in zip(images_per_row, row_blocks):
        placeholders = sum(len(b) for b in row)
        text = torch.randint(3, 500, (length - placeholders,), generator=gen)
        rows_ids.append(torch.cat([*row, text]))
        rows_images.append(images[taken : taken + count])
        taken += count
    input_ids = torch.stack(rows_ids)

    def assemble(ids: torch.Tensor, rows: list[list[Batch]]) -> Batch:
        batch: Batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        flat = [image for row in rows for image in row]
        if flat and family in _PADDED:
            batch.update(_padded_pixels(family, rows, max(len(row) for row in rows), ids.shape[1]))
        elif flat:
            batch.update({key: torch.cat([image[key] for image in flat]) for key in flat[0]})
        _token_fields(family, config, ids, batch)
        return batch

    full = assemble(input_ids, rows_images)
    if family == "mllama":
        # a row without images still runs cross-attention (fully masked) in a batch with images: its reference is
        # the row with its padding slots, not a text-only run (which skips those layers)
        return full, [{key: value[i : i + 1] for key, value in full.items()} for i in range(len(images_per_row))]
    singles = [assemble(input_ids[i : i + 1], [rows_images[i]]) for i in range(len(images_per_row))]
    return full, singles
