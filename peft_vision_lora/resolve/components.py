"""Find the parts of a loaded VLM: vision tower(s), projector, language model, cross-attention, Q-Former, audio.

Resolution is structural: a transformers VLM keeps its sub-configs on ``model.config`` (``vision_config``,
``text_config``, ``qformer_config``, ``audio_config``, ...; nested ones too, as in PI0's ``vlm_config`` or
T5Gemma 2's ``encoder``) and builds each tower from its sub-config, so the shallowest submodule whose ``.config`` *is*
that sub-config is the tower. Trainable modules beside the towers are the projector, as are merger modules inside
the vision tower (Qwen2-VL's ``visual.merger``, Qwen3-VL's ``deepstack_merger_list``). When the top config is itself
the text config (Idefics, GIT, Chameleon), the language model is the backbone minus the other components.

Some modules belong to no component and no flag ever targets them: VQ image tokenizers (Chameleon, Emu3, Janus:
their discrete codes pass no gradient) and a robot policy's action expert (PI0). A small override table and a
name-based fallback cover the models that break the rules.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import accumulate

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

EXCLUDED = "excluded"  # marker for towers that are no component (never targeted)

# Sub-config attribute name -> component. Checked in order; the first fragment found in the key wins. A key matching
# nothing (``vlm_config``, T5Gemma 2's ``encoder``) is searched for nested sub-configs.
_SUBCONFIG_COMPONENTS = (
    ("audio", "audio"),
    ("qformer", "qformer"),
    ("perceiver", "projector"),  # Idefics' perceiver resampler maps image features to latents for the text model
    ("vq", EXCLUDED),  # VQ image tokenizer: quantisation passes no gradient, nothing to adapt
    ("dit", EXCLUDED),  # PI0's action expert: a policy head, not part of the VLM
    ("vision", "vision"),
    ("image", "vision"),
    ("visual", "vision"),
    ("text", "language"),
    ("language", "language"),
    ("llm", "language"),
    ("decoder", "language"),
)
# Name-based fallback for models without sub-configs (remote code, hand-rolled VLMs).
_FALLBACK_NAMES = {
    "vision": ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"),
    "language": ("language_model", "text_model", "llm", "text_decoder", "decoder"),
    "audio": ("audio_tower", "audio_model", "audio_encoder"),
}
# Modules inside a vision tower that map vision features to text: projector, not vision layers (Qwen2-VL's merger,
# Qwen3-VL's deepstack mergers, Llama 4's pixel-shuffle vision_adapter, PP-FormulaNet's multi_modal_projector).
_IN_TOWER_PROJECTOR = re.compile(r"(merger|merger_list|projector|connector|aligner|adapter)$")
# Blocks of the language model whose keys/values come from image features: Mllama's cross_attn, Idefics' gated
# cross-attention layers, BLIP's BERT crossattention, and the decoder cross-attention of encoder-decoder VLMs (BART's
# encoder_attn, T5's EncDecAttention, Pix2Struct's encoder_decoder_attention) whose encoder output carries the image.
_CROSS_ATTENTION = re.compile(
    r"(cross_attn|cross_attention|crossattention|gated_cross_attn_layers|encoder_attn|EncDecAttention"
    r"|encoder_decoder_attention)$"
)
# Parts of a module path that are embeddings (token, position, patch; Gemma 4 unified's encoder-free patch_dense is
# its patch embedding): never targets. Multimodal embedders (Gemma 3n/4's ``embed_vision``, ``embed_audio``) map
# features into the text space: they are projectors.
_EMBEDDING_PART = re.compile(r"embed|^wte$|^wpe$")
_MODALITY_EMBEDDER = re.compile(r"^embed_(vision|audio|image|video)$")
# A projector root whose own name says audio (Gemma's ``embed_audio``) maps audio features: the audio path.
_AUDIO_SIDE = re.compile(r"audio[^.]*$")

# Per-model_type corrections, applied after structural resolution: component -> module paths, plus EXCLUDED paths.
OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    # An encoder (any vision model config) and a decoder (any text model): sub-config keys name neither. The decoder
    # reads the encoder's last_hidden_state only: its pooler (ViT's) runs but reaches nothing. enc_to_dec_proj, built
    # when the widths differ, is found as the projector by structure.
    "vision-encoder-decoder": {"vision": ("encoder",), "language": ("decoder",), EXCLUDED: ("encoder.pooler",)},
    # UDOP has no vision tower: image patches enter the shared T5 encoder through a patch embedding.
    "udop": {"language": ("encoder", "decoder")},
    # GIT: the top config is the text config; the BERT-style stack is git.encoder.
    "git": {"language": ("git.encoder",), "projector": ("git.visual_projection",)},
    # Janus: only the understanding path; image generation (VQ codes in and out) is no component.
    "janus": {
        "projector": ("model.aligner",),
        EXCLUDED: ("model.generation_aligner", "model.generation_head"),  # model.vqmodel: by its vq_config
    },
    # DeepSeek-VL hybrid: the SAM neck and downsampling convs belong to the high-resolution vision encoder. The
    # low-resolution path reads SigLIP's last_hidden_state only: its attention-pooling head runs but reaches nothing.
    "deepseek_vl_hybrid": {
        "vision": (
            "model.vision_model",
            "model.high_res_vision_model",
            "model.high_res_vision_neck",
            "model.high_res_vision_proj",
        ),
        "projector": ("model.aligner",),
        EXCLUDED: ("model.vision_model.head",),
    },
    # Apertus 1.5: the vision sub-config builds a VQ image tokenizer (argmax codes, then the text embedding table):
    # no gradient reaches it, so there is no vision tower to adapt. The audio sub-config builds a WavTokenizer
    # encoder, quantised the same way (nearest-codebook indices): no audio tower either.
    "apertus1p5": {"vision": (), "audio": (), EXCLUDED: ("model.vision_tokenizer", "model.audio_tokenizer")},
    # Idefics: the top config is the text config; the perceiver resampler is built without a config attribute.
    "idefics": {"projector": ("model.perceiver_resampler",)},
    # DiffusionGemma: the block-diffusion decoder is a second text stack, built from the top config.
    "diffusion_gemma": {"language": ("model.encoder.language_model", "model.decoder")},
    # Ovis 2: the visual head maps vision features onto the visual vocabulary, whose probabilities the visual
    # embedding table turns into text-width embeddings: together they are the projector (the table is no linear,
    # but finetune_projector='full' trains it).
    "ovis2": {
        "projector": (
            "model.vision_tower.head_linear",
            "model.vision_tower.head_norm",
            "model.visual_embeddings_table",
        )
    },
    # Evolla is a protein-text model: its protein encoder takes the vision role, the resampler the projector's.
    "evolla": {
        "vision": ("model.protein_encoder.model",),
        "projector": ("model.protein_encoder.sequence_compressor_resampler",),
        "language": ("model",),
    },
}
# Per-model_type cross-attention block names the generic pattern does not know (Evolla's protein adapters).
_CROSS_ATTENTION_BY_TYPE: dict[str, re.Pattern] = {"evolla": re.compile(r"\.adapter$")}


@dataclass(frozen=True)
class ComponentMap:
    """Module-path prefixes of each component, and how each was found (for ``explain``).

    ``excluded`` are prefixes that belong to no component (VQ tokenizers, action experts): a module under one of them
    has no component even when a shorter component prefix (the backbone) covers it.
    """

    model_type: str
    paths: dict[str, tuple[str, ...]]
    how: dict[str, str] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()

    def __getitem__(self, component: str) -> tuple[str, ...]:
        return self.paths.get(component, ())

    def component_of(self, name: str) -> str | None:
        """The component owning module ``name``: the longest matching prefix wins (merger in visual -> projector);
        an excluded prefix wins a tie."""
        matches = [
            (len(prefix), component)
            for component, prefixes in [(EXCLUDED, self.excluded), *self.paths.items()]
            for prefix in prefixes
            if name == prefix or name.startswith(prefix + ".")
        ]
        if not matches:
            return None
        best = max(matches, key=lambda match: match[0])[1]  # max keeps the first of equal lengths: the exclusion
        return None if best == EXCLUDED else best

    def describe(self) -> str:
        parts = [f"{c}={list(p)}" for c, p in self.paths.items() if p]
        if self.excluded:
            parts.append(f"excluded={list(self.excluded)}")
        return f"{self.model_type}: " + (", ".join(parts) or "no components found")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel / tuner wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while hasattr(model, "peft_config") and hasattr(model, "model") and not hasattr(model, "config"):
        model = model.model
    return model


def _subconfigs(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig]]:
    """(key, sub-config) pairs, searching inside sub-configs whose key names no component (``vlm_config``).

    Sub-configs are attributes of their config (every key of a transformers config's ``sub_configs`` is one). A
    nested sub-config is named by its own key: the keys above it name no component, else it would not be searched.
    """
    found = []
    for key, sub in vars(config).items():
        if not isinstance(sub, PretrainedConfig):
            continue
        found.append((key, sub))
        if _component_for_key(key) is None:
            found += _subconfigs(sub)
    return found


def _component_for_key(key: str) -> str | None:
    for fragment, component in _SUBCONFIG_COMPONENTS:
        if fragment in key:
            return component
    return None


def _shallowest(paths: list[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(paths, key=lambda p: (p.count("."), p)):
        if not any(path == k or path.startswith(k + ".") for k in kept):
            kept.append(path)
    return tuple(kept)


def _towers_from_subconfigs(model: nn.Module) -> dict[str, list[str]]:
    config = getattr(model, "config", None)
    found: dict[str, list[str]] = {}
    if not isinstance(config, PretrainedConfig):
        return found
    by_id = {}
    for key, sub in _subconfigs(config):
        component = _component_for_key(key)
        if component is not None:
            by_id[id(sub)] = component
    models: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        sub = getattr(module, "config", None)
        if name and sub is not None and id(sub) in by_id and sub is not config:
            found.setdefault(by_id[id(sub)], []).append(name)
            if isinstance(module, PreTrainedModel):
                models.setdefault(by_id[id(sub)], []).append(name)
    # A tower is a model built from its sub-config. Blocks elsewhere built from the same sub-config (Kosmos-2's
    # projector holds an attention made from text_config) are not part of it.
    return {c: models.get(c) or names for c, names in found.items()}


def _towers_from_names(model: nn.Module, component: str) -> list[str]:
    wanted = _FALLBACK_NAMES[component]
    hits = [n for n, _ in model.named_modules() if n and n.split(".")[-1] in wanted]
    return list(_shallowest(hits))[:4]


def _inside(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def output_heads(model: nn.Module) -> set[int]:
    """ids of the output heads (the model's and every nested transformers model's): never LoRA targets unless named.

    NemotronH-Omni keeps its ``lm_head`` inside ``language_model``, which the top model does not report.
    """
    heads = set()
    for module in [model, *(m for m in model.modules() if isinstance(m, PreTrainedModel))]:
        getter = getattr(module, "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except Exception:  # some remote-code models raise here
            continue
        if isinstance(head, nn.Module):
            heads.add(id(head))
    return heads


def _projector_roots(model: nn.Module, towers: list[str]) -> list[str]:
    """Shallowest modules holding trainable weights outside every tower and *beside* one: the vision-to-text mapping.

    Parameters count, not only linears: Gemma 3's projector is a bare weight matrix plus a norm. Modules elsewhere
    (PI0's action projections at the top level) are on no path between the towers and stay unassigned.
    """
    excluded = output_heads(model)
    tower_parents = {_parent(t) for t in towers}
    roots = []
    for name, module in model.named_modules():
        if not name or id(module) in excluded or _inside(name, towers) or is_embedding_path(name):
            continue
        if isinstance(module, nn.Embedding):
            continue
        own = list(module.parameters(recurse=False))  # pragma: no mutate (recurse=None is recurse=False)
        if not own:
            continue
        for prefix in accumulate(name.split("."), lambda path, part: f"{path}.{part}"):
            if not any(t == prefix or t.startswith(prefix + ".") for t in towers):
                if _parent(prefix) in tower_parents:
                    roots.append(prefix)
                break
    return list(_shallowest(roots))


def _in_tower_projectors(model: nn.Module, vision: tuple[str, ...]) -> list[str]:
    hits = [
        name
        for name, _ in model.named_modules()
        if _inside(name, vision) and name not in vision and _IN_TOWER_PROJECTOR.search(name)
    ]
    return list(_shallowest(hits))


def _cross_attention_blocks(model: nn.Module, language: tuple[str, ...], model_type: str) -> list[str]:
    extra = _CROSS_ATTENTION_BY_TYPE.get(model_type)
    hits = [
        n
        for n, _ in model.named_modules()
        if _inside(n, language) and (_CROSS_ATTENTION.search(n) or (extra is not None and extra.search(n)))
    ]
    return list(_shallowest(hits))


def is_embedding_path(name: str) -> bool:
    """Embeddings and patch embeddings (``patch_embed.proj``, ``embeddings.patch_embedding``) are never targets;
    multimodal embedders (``embed_vision.embedding_projection``) are projectors, not embeddings."""
    parts = name.split(".")
    if "patch_dense" in parts:
        return True
    if any(_MODALITY_EMBEDDER.match(part) for part in parts):
        return False
    return any(_EMBEDDING_PART.search(part) for part in parts)


def _backbone(model: nn.Module) -> str | None:
    """The transformers backbone (``base_model_prefix``): the language model when the top config is the text one."""
    if not isinstance(model, PreTrainedModel):
        return None
    prefix = model.base_model_prefix
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return None


def resolve_components(model: nn.Module) -> ComponentMap:
    """Locate each component on ``model`` (a transformers VLM, possibly wrapped by PEFT)."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    found = _towers_from_subconfigs(model)
    how = {c: "sub-config" for c in found}
    for component in ("vision", "language", "audio"):
        if not found.get(component):
            names = _towers_from_names(model, component)
            if names:
                found[component], how[component] = names, "name"
    if not found.get("language"):
        backbone = _backbone(model)
        if backbone and not _inside(backbone, found.get("vision", [])):
            # No text sub-config: the top config is the text config, and the backbone minus the other parts is the
            # language model (longest prefix wins in component_of).
            found["language"], how["language"] = [backbone], "backbone"
    paths: dict[str, tuple[str, ...]] = {c: _shallowest(p) for c, p in found.items() if c != EXCLUDED}
    excluded = list(found.get(EXCLUDED, []))
    for component, override in OVERRIDES.get(model_type, {}).items():
        if component == EXCLUDED:
            excluded += list(override)
        else:
            paths[component], how[component] = tuple(override), "override"

    towers = [p for c in ("vision", "language", "audio", "qformer") for p in paths.get(c, ())] + excluded
    # A backbone language model holds the rest (its siblings inside it are text layers): no projector by structure.
    roots = _projector_roots(model, towers) if how.get("language") != "backbone" else []
    audio_side = [r for r in roots if _AUDIO_SIDE.search(r)]
    projector = _in_tower_projectors(model, paths.get("vision", ())) + [r for r in roots if r not in audio_side]
    if how.get("projector") != "override" and projector:
        paths["projector"] = _shallowest(projector + list(paths.get("projector", ())))
        how["projector"] = "structure"
    if audio_side:
        paths["audio"] = _shallowest(list(paths.get("audio", ())) + audio_side)
        how.setdefault("audio", "structure")
    cross = _cross_attention_blocks(model, paths.get("language", ()), model_type)
    if cross:  # no sub-config or override names cross-attention: it is found by structure only
        paths["cross_attention"], how["cross_attention"] = tuple(cross), "structure"
    return ComponentMap(model_type=model_type, paths=paths, how=how, excluded=_shallowest(excluded))


def layer_slot(
    components: ComponentMap,
    modules: dict[str, nn.Module],
    component: str,
    name: str,
    patterns: Collection[str] = (),
) -> tuple[str, int, int] | None:
    """(stack, layer index, stack length) of module ``name``: the first numbered element below its component's root.

    Cross-attention blocks are counted in the language model's stacks (Mllama's ``layers.3.cross_attn`` is layer
    3). A component with several stacks (Mllama's local and global vision encoders, an encoder-decoder's two
    stacks) has one slot per stack. With ``patterns`` (PEFT's ``layers_pattern``), only a numbered element whose
    parent is named in ``patterns`` counts. None for modules outside every numbered stack (a pooling head).
    """
    roots = components["language" if component == "cross_attention" else component]
    root = max((r for r in roots if name.startswith(r + ".")), default=None)  # nested roots: the deepest sorts last
    if root is None:
        return None
    parts = name.split(".")
    for position in range(root.count(".") + 1, len(parts)):
        part = parts[position]
        if part.isdigit() and (not patterns or parts[position - 1] in patterns):
            stack = ".".join(parts[:position])
            length = sum(key.isdigit() for key, _ in modules[stack].named_children())  # any container's layers
            return stack, int(part), length
    return None
