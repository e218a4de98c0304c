"""Tiny random-init vision-language models and forward-ready batches.

Tests, the demo, examples and benchmarks need real transformers VLM *architectures* (the module tree is what the
tuner resolves) but cannot download weights. Every model here is built from its transformers config class with all
sizes shrunk (hidden 32, 2 layers, 4 heads, vocab 512, 32x32 images, 8x8 patches), so each one has well under 2M
parameters and builds in a fraction of a second on CPU.

Token ids 500-511 are reserved for image/video/special placeholders; random text tokens are drawn from [3, 500).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

__all__ = ["SUPPORTED_TINY_MODEL_TYPES", "build_tiny_vlm", "tiny_config", "tiny_inputs"]

SUPPORTED_TINY_MODEL_TYPES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "llava",
    "llava_next",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "mllama",
    "blip-2",
    "video_llava",
    "internvl",
    "mistral3",
    "kosmos-2",
)

HIDDEN = 32
VOCAB = 512
IMAGE = 32
PATCH = 8
IMAGE_TOKEN, VIDEO_TOKEN, START_TOKEN, END_TOKEN = 511, 510, 509, 508
_TEXT_TOKENS = (3, 500)  # random text ids stay clear of pad/bos/eos (0-2) and the placeholders (500+)

# Size fields shrunk wherever a (sub-)config has them. Names differ per family (depth/layers/num_hidden_layers, ...).
_TINY_FIELDS: dict[str, int] = {
    "hidden_size": HIDDEN,
    "embed_dim": HIDDEN,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "num_hidden_layers": 2,
    "depth": 2,
    "layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": HIDDEN // 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "image_size": IMAGE,
    "patch_size": PATCH,
    "projection_dim": HIDDEN,
    "text_hidden_size": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "encoder_hidden_size": HIDDEN,
    "out_hidden_size": HIDDEN,
    "image_text_hidden_size": HIDDEN,
    "query_pre_attn_scalar": HIDDEN // 4,
    "vision_output_dim": HIDDEN,
}
# Derived fields recomputed by the config's __post_init__ from the shrunk sizes (stale otherwise).
_DERIVED_FIELDS = ("layer_types", "max_window_layers", "rope_parameters", "rope_scaling", "num_image_tokens")
_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# mrope_section must sum to head_dim // 2 (= 4) or Qwen2-VL's rotary embedding cannot be applied.
_QWEN_TEXT = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}}
_QWEN_TOP = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": START_TOKEN,
    "vision_end_token_id": END_TOKEN,
}

# Per-type fixes the generic shrink cannot know: placeholder ids inside the vocab, counts tied to image size.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_vl": {**_QWEN_TOP, "text_config": _QWEN_TEXT},
    "qwen2_5_vl": {
        **_QWEN_TOP,
        "text_config": _QWEN_TEXT,
        # window_size // spatial_merge_size // patch_size = 2 merged patches per window side.
        "vision_config": {"window_size": 32, "fullatt_block_indexes": [1]},
    },
    "llava": {"image_token_index": IMAGE_TOKEN, "image_seq_length": 16},
    "llava_next": {
        "image_token_index": IMAGE_TOKEN,
        "image_seq_length": 16,
        "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
    },
    "idefics3": {"image_token_id": IMAGE_TOKEN, "pad_token_id": 0},
    "smolvlm": {"image_token_id": IMAGE_TOKEN, "pad_token_id": 0},
    "paligemma": {"image_token_index": IMAGE_TOKEN},
    "gemma3": {
        "image_token_index": IMAGE_TOKEN,
        "boi_token_index": START_TOKEN,
        "eoi_token_index": END_TOKEN,
        "mm_tokens_per_image": 4,  # 4x4 patches average-pooled to 2x2
        "text_config": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
        "vision_config": {"vision_use_head": False},  # real Gemma3 checkpoints have no SigLIP head
    },
    "mllama": {
        "image_token_index": IMAGE_TOKEN,
        "text_config": {"cross_attention_layers": [1]},
        "vision_config": {
            "num_global_layers": 1,
            "intermediate_layers_indices": [0, 1],
            "vision_output_dim": HIDDEN * 3,  # hidden * (1 + len(intermediate_layers_indices))
            "max_num_tiles": 2,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
    },
    "blip-2": {
        "image_token_index": IMAGE_TOKEN,
        "num_query_tokens": 4,
        "vision_config": {"initializer_range": 0.02},  # default 1e-10 makes the tower ignore its pixels
    },
    "video_llava": {"image_token_index": IMAGE_TOKEN, "video_token_index": VIDEO_TOKEN, "image_seq_length": 16},
    "internvl": {"image_token_id": IMAGE_TOKEN, "image_seq_length": 4},
    "mistral3": {"image_token_index": IMAGE_TOKEN},
    "kosmos-2": {"latent_query_num": 4},
}


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    """Shrink the known size fields of one flat config dict, keeping list/tuple shapes (InternVL's image_size)."""
    out = {k: v for k, v in values.items() if k not in _DERIVED_FIELDS}
    for key, tiny in _TINY_FIELDS.items():
        if key not in out or out[key] is None:
            continue
        out[key] = type(out[key])([tiny] * len(out[key])) if isinstance(out[key], (list, tuple)) else tiny
    for key, special in _SPECIAL_IDS.items():
        if isinstance(out.get(key), int):
            out[key] = special
    return out


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Config of `model_type` with every sub-config shrunk; `overrides` (top-level or `text_config={...}`) win."""
    if model_type not in SUPPORTED_TINY_MODEL_TYPES:
        raise ValueError(
            f"Unsupported tiny model type {model_type!r}; supported: {', '.join(SUPPORTED_TINY_MODEL_TYPES)}"
        )
    default = AutoConfig.for_model(model_type).to_dict()
    top: dict[str, Any] = {}
    for key, value in default.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text/vision/qformer)
            top[key] = _shrink(value)
        elif key not in ("transformers_version", "model_type", "id2label", "label2id"):
            top[key] = value
    top = _shrink(top)
    for layer in (_OVERRIDES[model_type], overrides):
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(top.get(key), dict):
                top[key] = {**top[key], **copy.deepcopy(value)}
            else:
                top[key] = copy.deepcopy(value)
    return AutoConfig.for_model(model_type, **top)


def build_tiny_vlm(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Random-init fp32 model in eval mode; the same seed gives the same weights (it reseeds torch's global RNG)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _wake_zero_inits(model)
    return model.eval()


# Parameters that transformers initialises to zero and real checkpoints have learned. Left at zero they cut the
# image path, so no gradient reaches the vision tower: Mllama's tanh gates (cross-attention and tile embeddings),
# Gemma3's projector matrix, BLIP-2's query tokens (identical queries make Q-Former self-attention constant).
_ZERO_INIT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "mllama": ("gate",),  # tile-embedding gates and cross_attn_{attn,mlp}_gate; not gate_proj (ends in .weight)
    "gemma3": ("mm_input_projection_weight",),
    "blip-2": ("query_tokens",),
}


def _wake_zero_inits(model: PreTrainedModel) -> None:
    suffixes = _ZERO_INIT_SUFFIXES.get(model.config.model_type, ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.split(".")[-1].endswith(suffixes):
                continue
            if param.numel() == 1:
                param.fill_(0.5)  # a gate: tanh(0.5) ~ 0.46 lets the gated branch through
            else:
                param.normal_(std=param.shape[-1] ** -0.5)


# --------------------------------------------------------------------------------------------------------------------
# Forward-ready batches. Each builder returns the image placeholder block (token ids put before the text) and the
# image tensors; the placeholder count must equal the number of image features the model produces, or it raises.
# --------------------------------------------------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _side(vision: PretrainedConfig) -> tuple[int, int]:
    """(image side, patches per side) of a vision config whose image/patch sizes may be ints or pairs."""
    image, patch = vision.image_size, vision.patch_size
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return image, image // patch


def _qwen(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    vision = config.vision_config
    grid = IMAGE // vision.patch_size  # patches per side of a 32x32 image, before the 2x2 merge
    flat_patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    tokens = grid * grid // vision.spatial_merge_size**2
    block = [config.vision_start_token_id] + [config.image_token_id] * tokens + [config.vision_end_token_id]
    pixels = _pixels(gen, batch * grid * grid, flat_patch)  # (sum of t*h*w patches, C*T*P*P)
    return block, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)}


def _llava(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    tokens = side * side + (config.vision_feature_select_strategy == "full")  # "default" drops CLS
    return [config.image_token_id] * tokens, {"pixel_values": _pixels(gen, batch, 3, image, image)}


def _llava_next(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    from transformers.image_processing_utils import select_best_resolution

    image, side = _side(config.vision_config)
    best_h, best_w = select_best_resolution((image, image), config.image_grid_pinpoints)
    rows, cols = best_h // image, best_w // image
    # base image + rows*cols crops; unpadded crop features add one "newline" token per feature row
    tokens = side * side + (side * rows) * (side * cols) + side * rows
    pixels = _pixels(gen, batch, 1 + rows * cols, 3, image, image)
    return [config.image_token_id] * tokens, {
        "pixel_values": pixels,
        "image_sizes": torch.tensor([[image, image]] * batch),
    }


def _idefics3(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    tokens = side * side // config.scale_factor**2  # pixel shuffle folds scale x scale patches into one token
    pixels = _pixels(gen, batch, 1, 3, image, image)  # (batch, images per sample, C, H, W)
    mask = torch.ones(batch, 1, image, image, dtype=torch.bool)
    return [config.image_token_id] * tokens, {"pixel_values": pixels, "pixel_attention_mask": mask}


def _paligemma(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    return [config.image_token_id] * side * side, {"pixel_values": _pixels(gen, batch, 3, image, image)}


def _gemma3(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, _ = _side(config.vision_config)
    block = [config.boi_token_id] + [config.image_token_id] * config.mm_tokens_per_image + [config.eoi_token_id]
    return block, {"pixel_values": _pixels(gen, batch, 3, image, image)}


def _mllama(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, _ = _side(config.vision_config)
    tiles = config.vision_config.max_num_tiles
    tile_mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    tile_mask[..., 0] = 1  # one 32x32 tile used, the rest padding
    extra = {
        "pixel_values": _pixels(gen, batch, 1, tiles, 3, image, image),  # (batch, images, tiles, C, H, W)
        "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),  # 1-based index of [1, 1]; 0 is padding
        "aspect_ratio_mask": tile_mask,
    }
    return [config.image_token_id], extra


def _blip2(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, _ = _side(config.vision_config)
    return [config.image_token_id] * config.num_query_tokens, {"pixel_values": _pixels(gen, batch, 3, image, image)}


def _video_llava(
    config: PretrainedConfig, batch: int, gen: torch.Generator, frames: int = 2
) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    # images drop CLS ("default" strategy), video frames keep it: one block per tower so both towers run
    block = [config.image_token_id] * side * side + [config.video_token_id] * frames * (side * side + 1)
    extra = {
        "pixel_values": _pixels(gen, batch, 3, image, image),
        "pixel_values_videos": _pixels(gen, batch, frames, 3, image, image),
    }
    return block, extra


def _internvl(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    tokens = round(side * side * config.downsample_ratio**2)
    return [config.image_token_id] * tokens, {"pixel_values": _pixels(gen, batch, 3, image, image)}


def _mistral3(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, side = _side(config.vision_config)
    tokens = (side // config.spatial_merge_size) ** 2
    extra = {
        "pixel_values": _pixels(gen, batch, 3, image, image),
        "image_sizes": torch.tensor([[image, image]] * batch),
    }
    return [config.image_token_id] * tokens, extra


def _kosmos2(config: PretrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], Batch]:
    image, _ = _side(config.vision_config)
    block = [START_TOKEN] + [IMAGE_TOKEN] * config.latent_query_num + [END_TOKEN]
    return block, {"pixel_values": _pixels(gen, batch, 3, image, image)}


_IMAGE_BLOCKS = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "llava": _llava,
    "llava_next": _llava_next,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "blip-2": _blip2,
    "video_llava": _video_llava,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "kosmos-2": _kosmos2,
}


# Their top-level forward raises without pixel_values (BLIP-2 takes it positionally, Kosmos-2 checks for it).
_NEEDS_IMAGES = ("blip-2", "kosmos-2")


def tiny_inputs(
    model_or_type: PreTrainedModel | torch.nn.Module | str,
    batch_size: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    with_images: bool = True,
) -> Batch:
    """Batch for `model(**batch)`: image placeholders then `seq_len` random text tokens, plus `labels`.

    With images, the forward pass runs the vision tower and projector; the total length is `seq_len` plus the
    model's image placeholder count. The same seed gives the same tensors. BLIP-2 and Kosmos-2 need images.
    """
    # Any object with a transformers config works (a PeftModel forwards `.config` to the wrapped model).
    config = tiny_config(model_or_type) if isinstance(model_or_type, str) else model_or_type.config
    model_type = config.model_type
    if model_type not in _IMAGE_BLOCKS:
        raise ValueError(f"No tiny inputs for model type {model_type!r}; supported: {', '.join(_IMAGE_BLOCKS)}")
    if not with_images and model_type in _NEEDS_IMAGES:
        raise ValueError(f"{model_type!r} cannot run a text-only forward pass: its forward requires `pixel_values`")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(*_TEXT_TOKENS, (batch_size, seq_len), generator=gen)
    batch: Batch = {}
    if with_images:
        block, batch = _IMAGE_BLOCKS[model_type](config, batch_size, gen)
        input_ids = torch.cat([torch.tensor(block).expand(batch_size, -1), input_ids], dim=1)
        is_image = _placeholder_mask(config, input_ids)
        if model_type in ("qwen2_vl", "qwen2_5_vl"):
            batch["mm_token_type_ids"] = is_image.int()  # M-RoPE needs to know which positions are image
        elif model_type == "gemma3":
            batch["token_type_ids"] = is_image.long()  # image tokens attend bidirectionally
        elif model_type == "paligemma":
            batch["token_type_ids"] = (~is_image).long()  # image prefix 0, text suffix 1
        elif model_type == "mllama":
            tiles = config.vision_config.max_num_tiles
            cross = torch.zeros(batch_size, input_ids.shape[1], 1, tiles, dtype=torch.long)
            cross[..., 0] = 1  # every token (the image comes first) sees the one real tile
            batch["cross_attention_mask"] = cross
        elif model_type == "kosmos-2":
            batch["image_embeds_position_mask"] = is_image.long()
    batch["input_ids"] = input_ids
    batch["attention_mask"] = torch.ones_like(input_ids)
    batch["labels"] = input_ids.clone()
    return batch


def _placeholder_mask(config: PretrainedConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of image placeholders (video placeholders are not counted)."""
    image_id = getattr(config, "image_token_id", None)
    return input_ids == (IMAGE_TOKEN if image_id is None else image_id)
