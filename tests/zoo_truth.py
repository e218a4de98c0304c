"""Hand-written ground truth for the tiny model zoo: which module prefixes form which VLM component.

Written by reading each `transformers/models/*/modeling_*.py` (5.23) and printing `named_modules()` of the models
that `build_tiny_vlm` returns. Nothing here calls the package's resolver, so tests can check it independently.
Names are those of the top-level model (a PEFT-wrapped model adds `base_model.model.`).

Components: `vision` (encoder, minus `vision_exclude`), `projector` (vision -> language bridge), `language` (the
decoder, minus `cross_attention`), `cross_attention` (language blocks whose keys/values come from image features),
`qformer` (BLIP-2 only). `never`: lm_head, token/position embeddings and patch embeddings.

Structures that surprise:
- qwen2_vl / qwen2_5_vl: the projector is *inside* the vision module (`model.visual.merger`, a LayerNorm + 2-layer
  MLP under a child named `mlp`), so vision is `model.visual` minus the merger.
- mllama: the projector is a bare `nn.Linear` (`model.multi_modal_projector`, vision_output_dim -> text hidden).
  Cross-attention layers are whole decoder layers (`MllamaCrossAttentionDecoderLayer`, here `layers.1`) whose
  attention child is `cross_attn`; their `mlp` counts as language. The vision model has two encoders,
  `transformer` and the gated `global_transformer`.
- blip-2: no `model.` prefix. `vision_model` -> `qformer` (its own BERT-style attention/crossattention/
  intermediate_query/output_query blocks; `crossattention` attends to image features but is not in the language
  model, so it is qformer, not cross_attention) -> `language_projection` (Linear) -> `language_model`
  (OPTForCausalLM, lm_head at `language_model.lm_head`; OPT's fc1/fc2 sit directly in the decoder layer, no MLP
  parent). The learned `query_tokens` is a bare Parameter on the top-level model, not a module.
- kosmos-2: no `model.` prefix; `image_to_text_projection` holds a Linear `dense` and an attention `x_attn`
  (latent queries cross-attend to image features). Language is `text_model` (lm_head `text_model.lm_head`).
- gemma3: the projector has no nn.Linear at all (`mm_input_projection_weight` is a raw Parameter used in a matmul,
  plus RMSNorm and AvgPool2d), so its projector linear set is empty: LoRA cannot target it.
- mistral3: the projector holds a patch merger (`multi_modal_projector.patch_merger.merging_layer`).
- internvl: the projector is `model.multi_modal_projector` (the original remote code called it `mlp1`).
- video_llava: two vision towers (`model.image_tower`, `model.video_tower`) sharing one projector.
- idefics3 / smolvlm: projector `model.connector` (pixel shuffle, then `modality_projection.proj`); language is
  `model.text_model`.
- llava / llava_next / video_llava take vision_feature_layer=-2: the last CLIP layer runs but feeds nothing, so
  its parameters get no gradient (true of the real checkpoints too).
"""

from __future__ import annotations

import re

from torch import nn

COMPONENTS = ("vision", "projector", "language", "cross_attention", "qformer")


def _truth(vision, projector, language, never, vision_exclude=(), cross_attention=(), qformer=()):
    return {
        "vision": list(vision),
        "vision_exclude": list(vision_exclude),
        "projector": list(projector),
        "language": list(language),
        "cross_attention": list(cross_attention),
        "qformer": list(qformer),
        "never": list(never),
    }


def _llava_like(vision: str = "model.vision_tower", projector: str = "model.multi_modal_projector") -> dict:
    return _truth(
        [vision],
        [projector],
        ["model.language_model"],
        ["lm_head", "model.language_model.embed_tokens", f"{vision}.embeddings"],
    )


_QWEN = _truth(
    ["model.visual"],
    ["model.visual.merger"],
    ["model.language_model"],
    ["lm_head", "model.language_model.embed_tokens", "model.visual.patch_embed"],
    vision_exclude=["model.visual.merger"],
)
_IDEFICS3 = _truth(
    ["model.vision_model"],
    ["model.connector"],
    ["model.text_model"],
    ["lm_head", "model.text_model.embed_tokens", "model.vision_model.embeddings"],
)

ZOO_TRUTH: dict[str, dict[str, list[str]]] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "llava": _llava_like(),
    "llava_next": _llava_like(),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "paligemma": _llava_like(),
    "gemma3": _llava_like(),
    "mllama": _truth(
        ["model.vision_model"],
        ["model.multi_modal_projector"],
        ["model.language_model"],
        [
            "lm_head",
            "model.language_model.embed_tokens",
            "model.vision_model.patch_embedding",
            "model.vision_model.gated_positional_embedding",
            "model.vision_model.pre_tile_positional_embedding",
            "model.vision_model.post_tile_positional_embedding",
        ],
        cross_attention=["model.language_model.layers.1.cross_attn"],  # cross_attention_layers=[1]
    ),
    "blip-2": _truth(
        ["vision_model"],
        ["language_projection"],
        ["language_model"],
        [
            "language_model.lm_head",
            "language_model.model.decoder.embed_tokens",
            "language_model.model.decoder.embed_positions",
            "vision_model.embeddings",
        ],
        qformer=["qformer"],
    ),
    "video_llava": _truth(
        ["model.image_tower", "model.video_tower"],
        ["model.multi_modal_projector"],
        ["model.language_model"],
        [
            "lm_head",
            "model.language_model.embed_tokens",
            "model.image_tower.embeddings",
            "model.video_tower.embeddings",
        ],
    ),
    "internvl": _llava_like(),
    "mistral3": _truth(
        ["model.vision_tower"],
        ["model.multi_modal_projector"],
        ["model.language_model"],
        ["lm_head", "model.language_model.embed_tokens", "model.vision_tower.patch_conv"],
    ),
    "kosmos-2": _truth(
        ["vision_model"],
        ["image_to_text_projection"],
        ["text_model"],
        [
            "text_model.lm_head",
            "text_model.model.embed_tokens",
            "text_model.model.embed_positions",
            "vision_model.model.embeddings",
        ],
    ),
}

# Model types whose projector has no nn.Linear (see the module docstring).
PROJECTOR_WITHOUT_LINEAR = frozenset({"gemma3"})


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# Read from the transformers sources: these project `hidden_states[config.vision_feature_layer]` of each tower's
# `encoder.layers` (CLIP), so the layers after that hidden state never reach the output and are never adapted.
FEATURE_LAYER_READERS = {"llava": ["model.vision_tower"], "llava_next": ["model.vision_tower"]}
FEATURE_LAYER_READERS["video_llava"] = ["model.image_tower", "model.video_tower"]


def unreachable_vision_layers(model: nn.Module, model_type: str) -> list[str]:
    """Prefixes of the vision layers after the feature layer (hidden state i is the output of layer i - 1)."""
    unreachable = []
    for tower in FEATURE_LAYER_READERS.get(model_type, []):
        layers = model.get_submodule(f"{tower}.encoder.layers")
        feature = model.config.vision_feature_layer
        first_unused = feature if feature >= 0 else len(layers) + 1 + feature
        unreachable += [f"{tower}.encoder.layers.{i}" for i in range(first_unused, len(layers))]
    return unreachable


def expected_linears(model: nn.Module, model_type: str, component: str) -> set[str]:
    """Full names of the nn.Linear modules of `component`, never including lm_head or embeddings.

    Vision excludes `vision_exclude` and the projector prefixes (Qwen's merger lives in `model.visual`). Language
    excludes cross-attention: Mllama's `cross_attn` blocks form their own set, though they sit in the language model.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    truth = ZOO_TRUTH[model_type]
    excluded = list(truth["never"])
    if component == "vision":
        excluded += truth["vision_exclude"] + truth["projector"] + unreachable_vision_layers(model, model_type)
    if component == "language":
        excluded += truth["cross_attention"]
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and _under(name, truth[component])
        and not _under(name, excluded)
        and not name.endswith("lm_head")
    }


_ATTENTION = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|ffn|feed_forward|^intermediate|^output_query$")
_MLP_LEAVES = ("fc1", "fc2")  # OPT puts its MLP linears directly in the decoder layer


def expected_kind(name: str) -> str | None:
    """ "attention" or "mlp" from the nearest enclosing block's attribute name; None outside blocks.

    Walks the ancestors from the nearest one up and stops at a layer index (`layers.0`): a block is named
    `self_attn`, `cross_attn`, `attn`, `attention`, `crossattention`, `x_attn` (attention) or `mlp`, `ffn`,
    `feed_forward`, BERT's `intermediate_query` / `output_query` (MLP). `attention.output.dense` belongs to its
    `attention` block. A leaf fc1/fc2 directly under a layer index is an MLP (OPT).
    """
    *ancestors, leaf = name.split(".")
    for part in reversed(ancestors):
        if part.isdigit():
            break
        if _ATTENTION.search(part):
            return "attention"
        if _MLP.search(part):
            return "mlp"
    if ancestors and ancestors[-1].isdigit() and leaf in _MLP_LEAVES:
        return "mlp"
    return None


def expected_targets(model: nn.Module, model_type: str, components) -> dict[str, str]:
    """{linear name: its component} over `components`: the union of their `expected_linears` (disjoint sets)."""
    return {name: component for component in components for name in expected_linears(model, model_type, component)}
