"""Every image-text-to-text model type in transformers, as a tiny random-init model or a full-size meta model.

``tiny_models`` hand-tunes 14 families so they also run forward passes; this module covers the whole
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` table for *structural* work (component resolution, target selection,
``inspect``, the coverage table). Each default config is shrunk generically, sub-config by sub-config: the size
fields of ``tiny_models`` plus the extra names other families use (MoE, MLA, audio encoders, resamplers), and
per-layer lists (``layer_types``, ``mlp_layer_types``) and layer-index fields (``deepstack_visual_indexes``) are cut
to the shrunk depth keeping the first and last layer, so both kinds of an interleaved stack survive; a field the config
requires to equal another (WavTokenizer's ``codebook_dim == hidden_size``) stays equal. A small table adds what a
generic rule cannot know. Types that cannot be built here raise :class:`ZooBuildError` with the reason.

Only the structure is promised: forward-ready batches exist for the 14 ``tiny_models`` types, and a few shrunk
configs here (partial rotary M-RoPE, block diffusion) would need more than sizes to run a forward pass.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from .tiny import _SPECIAL_IDS, _TINY_FIELDS, SUPPORTED_TINY_MODEL_TYPES, build_tiny_vlm, tiny_config

__all__ = [
    "FULL_SIZE_ASSUMED",
    "MAX_TINY_PARAMS",
    "ZOO_MODEL_TYPES",
    "ZooBuildError",
    "build_full_size_on_meta",
    "build_zoo_model",
    "count_parameters_on_meta",
    "full_size_config",
    "model_class",
    "zoo_config",
]

ZOO_MODEL_TYPES: tuple[str, ...] = tuple(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
# A "tiny" model above this is a shrink that missed a size field (a 2.4B-parameter Inkling tower): refuse to build it.
MAX_TINY_PARAMS = 5_000_000
LAYERS = 2

# Size fields beyond tiny_models' set: encoder-decoder, MoE, MLA attention, linear attention, resamplers, audio.
_EXTRA_TINY_FIELDS: dict[str, int] = {
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 8,
    "num_layers": LAYERS,
    "n_layers": LAYERS,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "decoder_hidden_size": 32,
    "mlp_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "dense_intermediate_size": 64,
    "intermediate_size_mlp": 64,
    "moe_hidden_size": 32,
    "share_expert_dim": 32,
    "n_routed_experts": 4,
    "num_experts": 4,
    "num_local_experts": 4,
    "moe_num_experts": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "projector_hidden_size": 32,
    "projection_hidden_size": 32,
    "projection_hidden_dim": 32,
    "projection_intermediate_size": 64,
    "alignment_intermediate_size": 64,
    "projector_input_dim": 32,
    "projector_output_dim": 32,
    "resampler_depth": 1,
    "resampler_n_latents": 4,
    "resampler_num_latents": 4,
    "resampler_n_heads": 2,
    "resampler_heads": 2,
    "resampler_head_dim": 8,
    "resampler_dim_head": 8,
    "num_query_tokens": 4,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 8,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 512,
    "output_dim": 32,
    "downsample_hidden_size": 32,
    "output_channels": 32,
    "patch_embed_hidden_size": 32,
    "vision_hidden_size": 32,
    "merged_hidden_size": 32,
    "conv_output_size": 32,
    "num_global_layers": 1,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "hidden_sizes": 32,
    "num_embeddings": 64,
    "base_channels": 32,
    "latent_channels": 32,
    "image_token_embed_dim": 32,
    "adapter_in_dim": 32,
    "adapter_out_dim": 32,
    "adapter_input_size": 32,
    "downsample_channels": 32,
    "mm_embed_dim": 32,
    "mm_posemb_size": 16,
    "output_proj_dims": 32,
    "audio_embed_dim": 32,
    "post_conv_in_channels": 32,
    "post_conv_mid_channels": 32,
    "post_conv_out_channels": 32,
    "mamba_num_heads": 4,
    "mamba_head_dim": 8,
    "ssm_state_size": 16,
    "moe_shared_expert_intermediate_size": 32,
    "unpadded_vocab_size": 512,  # Inkling 2's LM head width (200,058 rows: 6.4M parameters at hidden 32)
    "output_vocab_size": 512,  # Apertus 1.5's pruned LM head
    "codebook_size": 64,  # VQ codebooks (Apertus 1.5's image codebook is a 131,072-row linear)
    "codebook_dim": 32,  # when it differs from hidden_size; equal ones stay tied (_TIED_FIELDS)
    "loop_gate_rank": 16,
    "num_res_blocks": LAYERS,  # VQ image tokenizers: residual blocks per encoder stage
    "num_filters": 4,  # WavTokenizer's SEANet encoder: num_filters * 2 ** len(upsampling_ratios) channels
}
# Fields that must stay equal to another field of the same config when they were equal in the default (WavTokenizer
# checks ``codebook_dim == hidden_size``): set to the partner's shrunk value rather than shrunk on their own.
_TIED_FIELDS: dict[str, str] = {"codebook_dim": "hidden_size"}
_SIZE_FIELDS = {**_TINY_FIELDS, **_EXTRA_TINY_FIELDS}
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_k")
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "depth", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
# Fields holding layer *indices* (not one entry per layer): remapped onto the kept layers.
_LAYER_INDEX_FIELDS = (
    "cross_attention_layers",
    "deepstack_visual_indexes",
    "fullatt_block_indexes",
    "global_attn_indexes",
    "full_attn_idxs",
    "intermediate_layers_indices",
    "moe_layers",
    "spatial_target_layers",
    "rope_scaling_layers",
    "insert_layer_id",
)
# Keys of a config dict that are not sub-configs even though they are dicts.
_SKIPPED_KEYS = ("transformers_version", "model_type", "id2label", "label2id", "_name_or_path", "architectures")


class ZooBuildError(RuntimeError):
    """A model type that cannot be built here; the message says why (missing package, config that cannot shrink)."""


def model_class(model_type: str) -> type[PreTrainedModel]:
    """The image-text-to-text class transformers registers for ``model_type``."""
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{model_type!r} is not an image-text-to-text model type of transformers {transformers.__version__}; "
            f"known types: {', '.join(ZOO_MODEL_TYPES)}."
        )
    return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])


def _kept_layers(total: int, keep: int = LAYERS) -> list[int]:
    """Which of ``total`` layers a shrunk stack keeps: first and last (then evenly spread)."""
    if total <= keep:
        return list(range(total))
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _remap_index(index: int, total: int, kept: list[int]) -> int:
    """Layer ``index`` of the original stack -> the nearest kept layer's new position."""
    if index < 0:
        return max(index, -len(kept))
    index = min(index, total - 1)
    return min(range(len(kept)), key=lambda pos: (abs(kept[pos] - index), pos))


def _shrink_values(values: dict[str, Any]) -> dict[str, Any]:
    """Shrink one config dict (recursing into sub-configs): sizes, per-layer lists and layer indices."""
    out: dict[str, Any] = {}
    total = next((values[k] for k in _LAYER_COUNT_FIELDS if isinstance(values.get(k), int)), None)
    kept = _kept_layers(total) if total else []
    for key, value in values.items():
        if key in _SKIPPED_KEYS or key == "vocabulary_map":
            out[key] = value
        elif isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink_values(value)
        elif key in _SIZE_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = min(value, _SIZE_FIELDS[key])
        elif key in _SIZE_FIELDS and isinstance(value, (list, tuple)) and value and total and len(value) == total:
            out[key] = [min(v, _SIZE_FIELDS[key]) for v in (value[i] for i in kept)]
        elif key in _SIZE_FIELDS and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            out[key] = type(value)([_SIZE_FIELDS[key]] * len(value))
        elif key in _EXPERTS_PER_TOKEN and isinstance(value, int):
            out[key] = min(value, 2)
        elif key in _LAYER_INDEX_FIELDS and total and isinstance(value, (list, tuple)):
            out[key] = sorted({_remap_index(int(v), total, kept) for v in value})
        elif key in _LAYER_INDEX_FIELDS and total and isinstance(value, int):
            out[key] = _remap_index(value, total, kept)
        elif key == "per_layer_config" and isinstance(value, dict) and total:
            out[key] = {str(kept.index(int(k))): _shrink_values(v) for k, v in value.items() if int(k) in kept}
        elif key == "kv_source_layers" and isinstance(value, list) and total and len(value) == total:
            out[key] = [_remap_index(value[i], total, kept) for i in kept]
        elif isinstance(value, list) and total and total > LAYERS and len(value) == total:
            out[key] = [value[i] for i in kept]  # one entry per layer: layer_types, mlp_layer_types, no_rope_layers
        else:
            out[key] = value
    for key, partner in _TIED_FIELDS.items():
        if key in out and partner in out and values.get(key) == values.get(partner):
            out[key] = out[partner]
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if isinstance(kv_heads, int) and kv_heads == heads and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # keep multi-head attention (MLA requires it)
    for key, special in _SPECIAL_IDS.items():
        if isinstance(out.get(key), int):
            out[key] = special
    return _fix_rope(out)


def _fix_rope(values: dict[str, Any]) -> dict[str, Any]:
    """M-RoPE sections must sum to head_dim // 2; rescale them to the shrunk head size."""
    rope = values.get("rope_parameters")
    if not isinstance(rope, dict):
        return values
    head_dim = values.get("head_dim") or (values.get("hidden_size", 0) // max(values.get("num_attention_heads", 1), 1))
    rope = copy.deepcopy(rope)
    for params in [rope, *[v for v in rope.values() if isinstance(v, dict)]]:
        section = params.get("mrope_section")
        if isinstance(section, list) and head_dim and sum(section) != head_dim // 2:
            half = head_dim // 2
            scaled = [max(1, s * half // sum(section)) for s in section]
            scaled[-1] += half - sum(scaled)
            params["mrope_section"] = scaled
    values["rope_parameters"] = rope
    return values


# What the generic shrink cannot know, per model type: token ids the model reads at build time, depth-tied counts.
_ROPE_3D = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
_ZOO_OVERRIDES: dict[str, dict[str, Any]] = {
    # The image placeholder is looked up in the tokenizer's vocabulary map when the model is built.
    "chameleon": {"vocabulary_map": {"<image>": 511}},
    "emu3": {"vocabulary_map": {"<image>": 511, "<|extra_200|>": 510}},
    # Image codes occupy [image_token_offset, audio_token_offset), audio codes follow; both ranges must fit the vocab.
    "apertus1p5": {"image_token_offset": 256, "audio_token_offset": 320, "image_token_id": 505, "audio_token_id": 506},
    # Defaults leave these unset (the checkpoints' config.json carries them).
    "cohere_compass": {
        "text_config": {"rope_parameters": {"full_attention": _ROPE_3D, "sliding_attention": _ROPE_3D}}
    },
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2}},
    "diffusion_gemma": {"text_config": {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}},
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": _ROPE_3D}},  # default mrope_section assumes head_dim 128
    "granite4_vision": {
        "vision_config": {"hidden_size": 64},  # the window Q-Former gets hidden_size // 64 heads
        "downsample_rate": "1/2",
        "deepstack_layer_map": [[0, 0], [1, 1]],
        "spatial_target_layers": [0, 1, 0, 1],
    },
    "hunyuan_vl": {"text_config": {"head_dim": 8}},
    # Looped layers (with their message gates) start at layer 6 and in multiples of the residual block size: make
    # layer 1 of the 2 the loop, so the tiny model has both kinds of layer.
    "inkling2_loop": {
        "text_config": {"n_layers_per_attn_res_block": 1, "loop_layer_index_start": 1, "loop_layer_index_end": 2}
    },
    "molmo2": {"adapter_config": {"vision_feature_layer": [-1, -2]}},
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 8,
            "indexer_budget": 8,
            "indexer_compress_ratio": 2,
        }
    },
}

# Types that cannot be built in this environment, and why; tests assert each of them really fails.
_MISSING_PACKAGES: dict[str, str] = {
    "timm": "TimmWrapperModel vision tower needs `timm`, which needs torchvision (PyPI's torchvision wheel links "
    "the CUDA torch libraries and does not load with the CPU torch)"
}


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "per_layer_config":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Settings of the released checkpoints that differ from the config class defaults and change the module tree
# (applied to tiny and full-size configs alike).
_CHECKPOINT_SETTINGS: dict[str, dict[str, Any]] = {"idefics": {"use_resampler": True}}


def _default_values(model_type: str) -> dict[str, Any]:
    """The default config as a dict, with optional sub-configs that default to None (Gemma 4's vision and audio
    towers) filled with their own defaults: without them the model has no tower to resolve."""
    config = AutoConfig.for_model(model_type)
    values = config.to_dict()
    for key, sub_class in (getattr(type(config), "sub_configs", None) or {}).items():
        if values.get(key) is None and isinstance(sub_class, type) and issubclass(sub_class, PretrainedConfig):
            values[key] = sub_class().to_dict()
    return _merge(values, _CHECKPOINT_SETTINGS.get(model_type, {}))


def zoo_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Tiny config of any image-text-to-text ``model_type`` (``tiny_config``'s hand-tuned one for its 14 types)."""
    model_class(model_type)  # rejects unknown types with the list of known ones
    if model_type in SUPPORTED_TINY_MODEL_TYPES:
        return tiny_config(model_type, **overrides)
    try:
        values = _shrink_values(_default_values(model_type))
        values = _merge(values, _ZOO_OVERRIDES.get(model_type, {}))
        values = _merge(values, overrides)
        values = {k: v for k, v in values.items() if k not in ("transformers_version", "model_type")}
        return AutoConfig.for_model(model_type, **values)
    except Exception as error:
        raise _build_error(model_type, error, "shrunk config") from error


def _build_error(model_type: str, error: Exception, stage: str) -> ZooBuildError:
    """A ZooBuildError naming a missing package when that is the cause, else the first line of the error."""
    if isinstance(error, ImportError):
        missing = [name for name in _MISSING_PACKAGES if f"requires the {name} library" in str(error)]
        if missing:
            return ZooBuildError(f"{model_type}: " + "; ".join(_MISSING_PACKAGES[name] for name in missing))
    first_line = (str(error).strip().splitlines() or [""])[0]
    return ZooBuildError(f"{model_type}: {stage} failed: {type(error).__name__}: {first_line}")


def _instantiate(model_type: str, config: PretrainedConfig) -> PreTrainedModel:
    try:
        return model_class(model_type)._from_config(config, dtype=torch.float32)
    except Exception as error:
        raise _build_error(model_type, error, "build") from error


def count_parameters_on_meta(config: PretrainedConfig, model_type: str) -> int:
    """Parameters ``config`` would build, counted without allocating them."""
    with torch.device("meta"):
        model = _instantiate(model_type, config)
    return sum(p.numel() for p in model.parameters())


def build_zoo_model(
    model_type: str, seed: int = 0, device: str | torch.device | None = None, max_params: int | None = MAX_TINY_PARAMS
) -> PreTrainedModel:
    """Tiny random-init model of any image-text-to-text type, in eval mode.

    ``device="meta"`` builds without memory (structure only). A model whose shrunk size exceeds ``max_params`` is
    refused before any weight is allocated. Raises :class:`ZooBuildError` saying why a type cannot be built.
    """
    if model_type in SUPPORTED_TINY_MODEL_TYPES and device is None:
        return build_tiny_vlm(model_type, seed=seed)
    config = zoo_config(model_type)
    if max_params is not None:
        params = count_parameters_on_meta(config, model_type)
        if params > max_params:
            raise ZooBuildError(f"{model_type}: shrunk model still has {params:,} parameters (cap {max_params:,})")
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            return _instantiate(model_type, config).eval()
    return _instantiate(model_type, config).eval()


# Full-size default configs that transformers ships inconsistent or incomplete: the smallest change that builds.
# Values marked "assumed" are not in the default config and only size modules LoRA does not target (fused expert
# weights, an indexer, per-layer Q-Former count), so the coverage fractions do not depend on them much.
_FULL_ROPE_3D = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [24, 20, 20]}
_FULL_SIZE_FIXES: dict[str, dict[str, Any]] = {
    "aya_vision": {"vision_config": {"num_attention_heads": 16}},  # SigLIP-so400m: 1152 / 16; the default's 14 fails
    "chameleon": {"vocabulary_map": {"<image>": 8711}},  # token ids only
    "emu3": {"vocabulary_map": {"<image>": 151851, "<|extra_200|>": 151846}},  # token ids only
    "cohere_compass": {"text_config": {"rope_parameters": {"full_attention": _FULL_ROPE_3D}}},
    "hunyuan_vl": {"text_config": {"head_dim": 128}},  # hidden_size / num_attention_heads, as the model assumes
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense"] + ["sparse"] * 31, "num_experts_per_tok": 6}},
    "diffusion_gemma": {"text_config": {"num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704}},
    "granite4_vision": {"downsample_rate": "1/4", "deepstack_layer_map": [[-19, 9], [-13, 6], [-7, 3], [-1, 0]]},
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 16,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 256,
            "indexer_budget": 2048,
            "indexer_compress_ratio": 4,
        }
    },
}
# Which of the fixes above invent values (shown next to the coverage numbers).
FULL_SIZE_ASSUMED = ("deepseek_ocr2", "diffusion_gemma", "granite4_vision", "qwen4_exp")


def full_size_config(model_type: str) -> PretrainedConfig:
    """The default (full-size) config of ``model_type``, with the few fixes some defaults need to build."""
    model_class(model_type)
    try:
        values = _merge(_default_values(model_type), _FULL_SIZE_FIXES.get(model_type, {}))
        values = {k: v for k, v in values.items() if k not in ("transformers_version", "model_type")}
        return AutoConfig.for_model(model_type, **values)
    except Exception as error:
        raise _build_error(model_type, error, "default config") from error


def build_full_size_on_meta(model_type_or_config: str | PretrainedConfig) -> PreTrainedModel:
    """A full-size model on the meta device: real module tree and shapes, no memory, no weights."""
    if isinstance(model_type_or_config, PretrainedConfig):
        config = model_type_or_config
        model_type = config.model_type
    else:
        model_type, config = model_type_or_config, full_size_config(model_type_or_config)
    with torch.device("meta"):
        return _instantiate(model_type, config)
