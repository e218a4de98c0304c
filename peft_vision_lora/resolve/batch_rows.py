"""Which sample each row of a vision tower's batch belongs to, read from the model's own inputs.

A mixed-adapter batch gives one adapter per sample, but a vision tower's batch is not the samples' batch: Qwen2-VL
flattens the patches of every image into one sequence, Mllama runs tiles, Idefics3 drops padding images, LLaVA-Next
runs crops, Pixtral concatenates all patches into one row, and a sample may hold several images or none. For each
family this module turns the forward inputs (`input_ids` placeholder counts, `image_grid_thw`, `image_sizes`,
padding images, tile counts) into *units*: for every unit name ("image", "patch", "tile", ...) the sample index of
each position of that unit, in the order the model feeds them to its tower. Shapes are never used to guess which
image is whose; the tuner only matches a layer's leading size to a unit's length, and refuses when two units of that
length disagree (`tuner/mixed_batch.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["MIXED_BATCH_MODEL_TYPES", "MixedBatchError", "sample_units"]

Units = dict[str, list[int]]  # unit name -> sample index of each position, in the tower's order


class MixedBatchError(ValueError):
    """A mixed-adapter batch whose tower rows cannot be mapped to their samples; says why and what to do."""


def _token_id(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise MixedBatchError(f"{config.model_type}: the config has none of {names}, so images cannot be counted per row")


def _input_ids(family: str, inputs: Mapping[str, Any]) -> torch.Tensor:
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise MixedBatchError(
            f"{family}: `adapter_names` with images needs `input_ids` to tell which row holds which image "
            "(got `inputs_embeds`); pass input_ids, or run one adapter per batch."
        )
    return input_ids


def _rows_by_tokens(
    family: str, input_ids: torch.Tensor, token_id: int, tokens_per_item: Sequence[int], what: str = "image"
) -> list[int]:
    """Sample index of each item (image, video), given each item's placeholder count, in row-major order."""
    per_row = (input_ids == token_id).sum(dim=1).tolist()
    rows: list[int] = []
    item = 0
    for row, count in enumerate(per_row):
        taken = 0
        while taken < count and item < len(tokens_per_item):
            taken += tokens_per_item[item]
            rows.append(row)
            item += 1
        if taken != count:
            raise MixedBatchError(
                f"{family}: row {row} has {count} {what} placeholder token(s), which do not add up to whole "
                f"{what}s of the given sizes {list(tokens_per_item)}; check that input_ids and the pixel inputs come "
                "from the same processor call."
            )
    if item != len(tokens_per_item):
        raise MixedBatchError(
            f"{family}: {len(tokens_per_item)} {what}(s) were given but input_ids hold placeholders for only {item}."
        )
    return rows


def _uniform_rows(family: str, input_ids: torch.Tensor, token_id: int, count: int, what: str = "image") -> list[int]:
    """Items whose placeholder count is the same for all (fixed-size towers): count per row / tokens per item."""
    total = int((input_ids == token_id).sum())
    if count == 0:
        return []
    if total % count:
        raise MixedBatchError(
            f"{family}: {total} {what} placeholder tokens cannot be split evenly over {count} {what}(s)."
        )
    return _rows_by_tokens(family, input_ids, token_id, [total // count] * count, what)


def _expand(rows: Sequence[int], sizes: Sequence[int]) -> list[int]:
    return [row for row, size in zip(rows, sizes) for _ in range(int(size))]


# ---- families --------------------------------------------------------------------------------------------------


def _qwen_vl(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    merge = config.vision_config.spatial_merge_size**2
    units: Units = {}
    for kind, pixels, grid_key, token_names in (
        ("", "pixel_values", "image_grid_thw", ("image_token_id",)),
        ("video_", "pixel_values_videos", "video_grid_thw", ("video_token_id",)),
    ):
        grid = inputs.get(grid_key)
        if inputs.get(pixels) is None or grid is None:
            continue
        patches = grid.prod(dim=-1).tolist()  # t*h*w patches per image; the merger folds `merge` of them into one
        merged = [p // merge for p in patches]
        rows = _rows_by_tokens(family, _input_ids(family, inputs), _token_id(config, *token_names), merged)
        units[f"{kind}patch"] = _expand(rows, patches)
        units[f"{kind}merged"] = _expand(rows, merged)
    return units


def _one_tower_batch(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    """Fixed-size towers fed `pixel_values` (images or crops, N, C, H, W): each image has the same placeholders."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return {}
    if family == "kosmos-2":  # no placeholder id: the position mask marks each row's image
        mask = inputs.get("image_embeds_position_mask")
        if mask is None:
            raise MixedBatchError("kosmos-2: `adapter_names` with images needs `image_embeds_position_mask`.")
        return {"image": _uniform_rows(family, mask, 1, pixels.shape[0])}
    token_id = _token_id(config, "image_token_id", "image_token_index")
    return {"image": _uniform_rows(family, _input_ids(family, inputs), token_id, pixels.shape[0])}


def _llava_next_tokens(config: Any, size: Sequence[int], strategy: str) -> int:
    """Placeholders of one image of `size` (H, W), by the model's own anyres grid and unpadding helpers."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size  # features per side of one crop
    base = side * side + (strategy == "full")  # the base (resized) image; "default" drops CLS
    rows, cols = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, vision.image_size)
    # the crops' feature map, unpadded back to the image's aspect ratio (shape only: a 0-channel tensor)
    height, width = unpad_image(torch.empty(0, rows * side, cols * side), list(size)).shape[1:]
    return base + height * (width + 1)  # one newline token closes each feature row


def _llava_next(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    if pixels is None:
        return {}
    if sizes is None:
        raise MixedBatchError(f"{family}: `adapter_names` with images needs `image_sizes`.")
    sizes = sizes.tolist()
    # an image's placeholder count depends on its size (anyres grid, unpadding, newlines), so rows holding several
    # images of different sizes are placed by each image's own count
    strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
    tokens = [_llava_next_tokens(config, size, strategy) for size in sizes]
    token_id = _token_id(config, "image_token_id", "image_token_index")
    rows = _rows_by_tokens(family, _input_ids(family, inputs), token_id, tokens)
    # the tower runs each image's real crops (base image first), padding crops of `pixel_values` are dropped
    crops = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in sizes
    ]
    return {"image": rows, "crop": _expand(rows, crops)}


def _idefics3(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    pixels = inputs.get("pixel_values")  # (batch, images, C, H, W); all-zero images are padding the model drops
    if pixels is None:
        return {}
    real = (pixels != 0).flatten(2).any(dim=-1)  # (batch, images), the model's own `real_images_inds`
    if not real.any():
        real.view(-1)[0] = True  # the model keeps one padding image rather than none
    return {"image": real.nonzero()[:, 0].tolist()}


def _mllama(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    pixels = inputs.get("pixel_values")  # (batch, images, tiles, C, H, W): padding images and tiles are run too
    if pixels is None:
        return {}
    batch, images, tiles = pixels.shape[:3]
    rows = torch.arange(batch).repeat_interleave(images)
    # the projector keeps (batch, images, tiles, ...), cross-attention keys/values see one row per tile
    return {"row": list(range(batch)), "image": rows.tolist(), "tile": rows.repeat_interleave(tiles).tolist()}


def _video_llava(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    units: Units = {}
    if inputs.get("pixel_values") is not None:
        units.update(_one_tower_batch(config, inputs, family))
    videos = inputs.get("pixel_values_videos")  # (videos, frames, C, H, W); the tower runs every frame
    if videos is not None:
        token_id = _token_id(config, "video_token_id", "video_token_index")
        rows = _uniform_rows(family, _input_ids(family, inputs), token_id, videos.shape[0], "video")
        units["frame"] = _expand(rows, [videos.shape[1]] * len(rows))
    return units


def _mistral3(config: Any, inputs: Mapping[str, Any], family: str) -> Units:
    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    if pixels is None:
        return {}
    if sizes is None:
        raise MixedBatchError(f"{family}: `adapter_names` with images needs `image_sizes`.")
    patch, merge = config.vision_config.patch_size, config.spatial_merge_size
    # Pixtral concatenates every image's patches into one sequence; the merger folds merge x merge of them
    patches = [(h // patch) * (w // patch) for h, w in sizes.tolist()]
    merged = [(h // (patch * merge)) * (w // (patch * merge)) for h, w in sizes.tolist()]
    token_id = _token_id(config, "image_token_id", "image_token_index")
    rows = _rows_by_tokens(family, _input_ids(family, inputs), token_id, merged)
    return {"image": rows, "patch": _expand(rows, patches), "merged": _expand(rows, merged)}


_FAMILIES: dict[str, Callable[[Any, Mapping[str, Any], str], Units]] = {
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
    "llava": _one_tower_batch,
    "paligemma": _one_tower_batch,
    "gemma3": _one_tower_batch,
    "internvl": _one_tower_batch,
    "blip-2": _one_tower_batch,
    "kosmos-2": _one_tower_batch,
    "llava_next": _llava_next,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "mllama": _mllama,
    "video_llava": _video_llava,
    "mistral3": _mistral3,
}
MIXED_BATCH_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def sample_units(config: Any, inputs: Mapping[str, Any], batch_size: int) -> Units:
    """Units of one forward call: each tower unit the inputs feed ("row" only where a tower-side layer sees samples).

    Raises :class:`MixedBatchError` for a family whose mapping is unknown, when pixel inputs are present; a
    text-only call (a decoding step) needs no mapping and works for every family.
    """
    units: Units = {}
    family = config.model_type
    has_pixels = any(key.startswith("pixel_values") and value is not None for key, value in inputs.items())
    if not has_pixels:
        return units
    if family not in _FAMILIES:
        raise MixedBatchError(
            f"Mixed-adapter batches (`adapter_names`) with images are not supported for model type {family!r}: "
            "which sample each vision-tower row belongs to is not known for it. Run one adapter per batch "
            f"(model.set_adapter(name)), or text-only rows. Supported: {', '.join(MIXED_BATCH_MODEL_TYPES)}."
        )
    units.update(_FAMILIES[family](config, inputs, family))
    for name, rows in units.items():
        if rows and not 0 <= min(rows) <= max(rows) < batch_size:
            raise MixedBatchError(f"{family}: unit {name!r} maps to rows outside the batch of {batch_size}.")
    return units


def leading_size(shape: Sequence[int]) -> int:
    """Positions of a (…, features) input: what a per-token adapter list must cover."""
    return math.prod(shape[:-1])
