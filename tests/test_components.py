"""Component resolution, one branch at a time: the model families that take each branch, and hand-rolled stand-ins.

Zoo models are compared with the hand truth of `zoo_wide_truth.py` (written from the transformers sources, not from
the resolver) module by module. Models without sub-configs (remote code, hand-rolled VLMs) are what the name
fallback is for: small `nn.Module` stand-ins exercise it, with the expected paths written out.
"""

import functools

import pytest
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MetaClip2VisionConfig,
    MetaClip2VisionModelWithProjection,
    PretrainedConfig,
)
from zoo_wide_truth import TRUTH, component_of

from peft_vision_lora import VisionLoraConfig, compile_targets
from peft_vision_lora.resolve.components import (
    ComponentMap,
    is_embedding_path,
    layer_slot,
    output_heads,
    resolve_components,
    unwrap_model,
)
from peft_vision_lora.zoo.catalog import build_zoo_model

# One or two families per branch: name-less towers from a sub-config (kosmos-2's projector attention built from
# text_config), nested sub-configs (pi0's vlm_config, t5gemma2's encoder), excluded VQ and action-expert sub-configs
# (chameleon, emu3, pi0), a backbone language model (idefics, chameleon, mistral4), in-tower projectors (qwen3_vl,
# llama4, minicpm), a projector without a linear (gemma3), modality embedders and an audio path beside the towers
# (gemma4, gemma4_unified), audio towers (qwen2_5_omni_thinker), output heads nested in a tower (nemotron_h_omni),
# cross-attention (mllama, blip, pix2struct, florence2, udop), Q-Formers (instructblip), and the override families
# (vision-encoder-decoder, janus, evolla, deepseek_vl_hybrid, ovis2, git).
ZOO_TYPES = (
    "blip",
    "chameleon",
    "deepseek_vl_hybrid",
    "emu3",
    "evolla",
    "florence2",
    "gemma3",
    "gemma4",
    "gemma4_unified",
    "git",
    "idefics",
    "idefics2",
    "instructblip",
    "janus",
    "kosmos-2",
    "llama4",
    "minicpmv4_6",
    "mistral4",
    "mllama",
    "nemotron_h_omni",
    "ovis2",
    "pi0",
    "pix2struct",
    "qwen2_5_omni_thinker",
    "qwen3_vl",
    "t5gemma2",
    "udop",
    "vision-encoder-decoder",
)


@functools.cache
def meta_model(model_type: str) -> nn.Module:
    """Structure only: resolution reads names and configs, so the meta device costs no memory."""
    return build_zoo_model(model_type, device="meta")


@pytest.mark.parametrize("model_type", ZOO_TYPES)
def test_every_module_with_weights_is_in_the_truths_component(model_type):
    """Each module holding weights (linears, norms, bare projector matrices) gets the component the hand truth gives
    it; excluded and unlisted modules (VQ tokenizers, output heads, action projections) get none."""
    model = meta_model(model_type)
    assert model_type in TRUTH
    components = resolve_components(model)
    assert components.model_type == model_type
    wrong = {
        name: (components.component_of(name), component_of(model_type, name))
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
        if components.component_of(name) != component_of(model_type, name)
    }
    assert wrong == {}


# How each component was found: the "how" column of `inspect` and `explain`.
HOW = {
    "blip": {"vision": "sub-config", "language": "sub-config", "cross_attention": "structure"},
    "chameleon": {"excluded": "sub-config", "language": "backbone"},
    "evolla": {"language": "override", "vision": "override", "projector": "override", "cross_attention": "structure"},
    "gemma4_unified": {"language": "sub-config", "projector": "structure", "audio": "structure"},
    "git": {"vision": "sub-config", "language": "override", "projector": "override"},
    "idefics": {
        "vision": "sub-config",
        "language": "backbone",
        "projector": "override",
        "cross_attention": "structure",
    },
    "idefics2": {"vision": "sub-config", "projector": "structure", "language": "sub-config"},
    "janus": {"vision": "sub-config", "excluded": "sub-config", "language": "sub-config", "projector": "override"},
    "mistral4": {"language": "backbone"},
    "qwen2_5_omni_thinker": {
        "audio": "sub-config",
        "vision": "sub-config",
        "language": "sub-config",
        "projector": "structure",
    },
}


@pytest.mark.parametrize("model_type", sorted(HOW))
def test_how_each_component_was_found(model_type):
    assert resolve_components(meta_model(model_type)).how == HOW[model_type]


def test_an_excluded_sub_config_is_excluded_without_an_override():
    """Janus' VQ model is excluded by its ``vq_config`` alone; the override adds the generation path."""
    components = resolve_components(meta_model("janus"))
    assert components.excluded == ("model.generation_aligner", "model.generation_head", "model.vqmodel")
    assert resolve_components(meta_model("chameleon")).excluded == ("model.vqmodel",)


def test_a_backbone_model_alone_names_only_modules_it_has():
    """A base model (no ``lm_head`` wrapper) has no attribute named by its ``base_model_prefix``: the language
    model is not claimed to live there."""
    model = LlamaModel(_llama_config())
    model.vision_tower = _stack()
    components = resolve_components(model)
    names = dict(model.named_modules())
    assert components["vision"] == ("vision_tower",)
    assert all(path in names for paths in components.paths.values() for path in paths)


def test_a_head_beside_a_backbone_language_model_is_no_projector():
    """A text-config-at-top model (a Llama classifier with a vision tower grafted on): the backbone is the language
    model; the classification head beside it maps text to labels, not vision to text."""
    model = LlamaForSequenceClassification(_llama_config(num_labels=3))
    model.model.vision_tower = _stack()
    components = resolve_components(model)
    assert components.paths == {"vision": ("model.vision_tower",), "language": ("model",)}
    assert components.how == {"vision": "name", "language": "backbone"}
    assert components.component_of("score") is None
    assert components.component_of("model.layers.0.self_attn.q_proj") == "language"


# --- hand-rolled stand-ins -------------------------------------------------------------------------------------


def _llama_config(**extra) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        **extra,
    )


def _stack(layers: int = 2) -> nn.Module:
    block = nn.Module()
    block.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
    return block


class HandRolledVLM(nn.Module):
    """A remote-code style VLM: no config, towers at the top level, an output head beside them."""

    def __init__(self):
        super().__init__()
        self.vision_tower = _stack()
        self.mm_projector = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.language_model = _stack()
        self.audio_encoder = _stack()
        self.lm_head = nn.Linear(8, 64)
        self.image_token_table = nn.Sequential(nn.Embedding(4, 8))  # an embedding table: never a projector
        self.image_newline_norm = nn.LayerNorm(8)  # weights without a linear beside the towers: projector

    def get_output_embeddings(self):
        return self.lm_head


def test_the_name_fallback_finds_towers_of_a_model_without_config():
    components = resolve_components(HandRolledVLM())
    assert components.model_type == "HandRolledVLM"
    assert components.paths == {
        "vision": ("vision_tower",),
        "language": ("language_model",),
        "audio": ("audio_encoder",),
        "projector": ("image_newline_norm", "mm_projector"),
    }
    assert components.how == {"vision": "name", "language": "name", "audio": "name", "projector": "structure"}
    assert components.excluded == ()
    assert components.component_of("lm_head") is None
    assert components.component_of("image_token_table.0") is None


def test_the_name_fallback_reads_the_last_path_element_at_any_depth():
    """``visual`` inside ``vision_tower`` is part of it (the shallowest wins); names match at any depth."""
    model = nn.Module()
    model.base = nn.Module()
    model.base.model = nn.Module()
    model.base.model.vision_tower = _stack()
    model.base.model.vision_tower.visual = _stack()
    model.base.model.text_decoder = _stack()
    model.base.model.mm_projector = nn.Linear(8, 8)
    model.base.heads = nn.Module()
    model.base.heads.value = nn.Linear(8, 1)  # not beside the towers: on no path between them
    components = resolve_components(model)
    assert components.paths == {
        "vision": ("base.model.vision_tower",),
        "language": ("base.model.text_decoder",),
        "projector": ("base.model.mm_projector",),
    }
    assert components.component_of("base.heads.value") is None


def test_the_name_fallback_keeps_the_four_shallowest_towers():
    """A name that turns up all over a model is a weak signal: at most four towers, the shallowest first."""
    model = nn.Module()
    for holder in ("b", "c", "d", "e"):
        setattr(model, holder, nn.Module())
        getattr(model, holder).vision = _stack()
    model.a = nn.Module()
    model.a.x = nn.Module()
    model.a.x.vision = _stack()
    assert resolve_components(model)["vision"] == ("b.vision", "c.vision", "d.vision", "e.vision")


def test_a_model_with_no_recognisable_part_finds_nothing():
    model = nn.Sequential(nn.Linear(8, 8))
    components = resolve_components(model)
    assert components.paths == {}
    assert components.describe() == "Sequential: no components found"


def test_a_vision_only_model_has_no_language_model():
    model = nn.Module()
    model.vision_model = _stack()
    components = resolve_components(model)
    assert components.paths == {"vision": ("vision_model",)}


def test_a_vision_encoder_backbone_is_not_the_language_model():
    """MetaCLIP 2's vision model with projection: its ``base_model_prefix`` names the vision tower."""
    config = MetaClip2VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    components = resolve_components(MetaClip2VisionModelWithProjection(config))
    assert components["vision"] == ("vision_model",)
    assert components["language"] == ()


class _Tower(nn.Module):
    """A tower built from a sub-config but no transformers model (a plain module holding ``config``)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))


class ComposedVLM(nn.Module):
    """Sub-configs on the top config, towers built from them under names the fallback does not know."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.config.image_size = 32  # not a sub-config
        self.config.speech_audio_config = PretrainedConfig()
        self.config.vlm_config = PretrainedConfig()  # names no component: searched for nested sub-configs (PI0)
        self.config.vlm_config.vision_config = PretrainedConfig()
        self.config.vlm_config.text_config = PretrainedConfig()
        self.image_encoder = _Tower(self.config.vlm_config.vision_config)
        self.speech = _Tower(self.config.speech_audio_config)
        self.text = _Tower(self.config.vlm_config.text_config)
        self.bridge = nn.Linear(8, 8)


def test_towers_built_from_sub_configs_are_found_by_identity():
    """The speech tower's name says nothing: its config does, as do the nested vision and text configs. The
    bridge beside the towers is the projector."""
    components = resolve_components(ComposedVLM())
    assert components.paths == {
        "vision": ("image_encoder",),
        "language": ("text",),
        "audio": ("speech",),
        "projector": ("bridge",),
    }
    assert components.how == {
        "vision": "sub-config",
        "language": "sub-config",
        "audio": "sub-config",
        "projector": "structure",
    }


def test_a_resampler_built_from_its_own_sub_config_is_projector_wherever_it_sits():
    """A perceiver resampler inside the vision module (built from ``perceiver_config``) maps image features to the
    text model: projector, next to the bridge found by structure."""
    model = ComposedVLM()
    model.config.perceiver_config = PretrainedConfig()
    model.image_encoder.resampler = _Tower(model.config.perceiver_config)
    components = resolve_components(model)
    assert components["projector"] == ("bridge", "image_encoder.resampler")
    assert components.component_of("image_encoder.resampler.layers.0") == "projector"
    assert components.component_of("image_encoder.layers.0") == "vision"


def test_peft_wrappers_are_seen_through():
    """A PeftModel and its tuner (which has no ``config`` on a config-less model) resolve like the bare model."""
    expected = resolve_components(HandRolledVLM()).paths
    peft_model = get_peft_model(HandRolledVLM(), LoraConfig(r=2, target_modules=["layers.0"]))
    assert resolve_components(peft_model).paths == expected
    assert resolve_components(peft_model.base_model).paths == expected
    assert unwrap_model(peft_model.base_model) is peft_model.base_model.model


class WrapperVLM(nn.Module):
    """A plain wrapper without ``get_output_embeddings``; the language model inside is a transformers model."""

    def __init__(self):
        super().__init__()
        self.vision_tower = _stack()
        self.language_model = LlamaForCausalLM(_llama_config())


class RemoteCodeVLM(WrapperVLM):
    """Remote code whose ``get_output_embeddings`` raises."""

    def get_output_embeddings(self):
        raise NotImplementedError


@pytest.mark.parametrize("wrapper", [WrapperVLM, RemoteCodeVLM])
def test_the_top_models_output_head_getter_does_not_hide_the_nested_heads(wrapper):
    model = wrapper()
    assert output_heads(model) == {id(model.language_model.lm_head)}
    targets = {t.name for t in compile_targets(model, VisionLoraConfig(r=2)).targets}
    assert "language_model.model.layers.0.self_attn.q_proj" in targets
    assert "language_model.lm_head" not in targets


# --- ComponentMap -----------------------------------------------------------------------------------------------


def test_component_of_takes_the_longest_prefix_and_an_exclusion_wins_a_tie():
    components = ComponentMap(
        "x",
        {"vision": ("v", "w"), "projector": ("v.merger",), "language": ("t",)},
        excluded=("t.vq", "w"),
    )
    assert components.component_of("v") == "vision"
    assert components.component_of("v.blocks.0") == "vision"
    assert components.component_of("v.merger.fc") == "projector"
    assert components.component_of("v.mergers") == "vision"
    assert components.component_of("t.layers.0") == "language"
    assert components.component_of("t.vq.conv") is None
    assert components.component_of("w.fc") is None
    assert components.component_of("vv") is None
    assert components.component_of("lm_head") is None


def test_describe_lists_the_found_components_and_the_exclusions():
    components = ComponentMap("m", {"vision": ("a",), "projector": (), "language": ("b", "c")}, excluded=("a.q",))
    assert components.describe() == "m: vision=['a'], language=['b', 'c'], excluded=['a.q']"
    assert ComponentMap("m", {"vision": ()}).describe() == "m: no components found"


@pytest.mark.parametrize(
    ("name", "embedding"),
    [
        ("model.vision_tower.patch_embed.proj", True),
        ("git.image_encoder.vision_model.embeddings.patch_embedding", True),
        ("model.language_model.embed_tokens", True),
        ("transformer.wte", True),
        ("transformer.wpe", True),
        ("model.vision_tower.patch_dense", True),  # Gemma 4 unified's encoder-free patch embedding
        ("model.embed_vision.embedding_projection", False),  # a multimodal embedder is a projector
        ("model.embed_audio.embedding_projection", False),
        ("model.language_model.layers.0.self_attn.q_proj", False),
        ("transformer.wte_norm", False),
    ],
)
def test_embedding_paths(name, embedding):
    assert is_embedding_path(name) is embedding


# --- layer_slot ---------------------------------------------------------------------------------------------------


def _slot(model, component, name, patterns=()):
    return layer_slot(resolve_components(model), dict(model.named_modules()), component, name, patterns)


def test_a_q_former_inside_a_numbered_projector_counts_its_own_layers():
    """Granite 4 Vision's Q-Formers sit in numbered projectors: the layer is the Q-Former's, not the projector's."""
    model = meta_model("granite4_vision")
    name = "model.layerwise_projectors.1.qformer.encoder.layer.0.attention.attention.query"
    assert _slot(model, "qformer", name) == ("model.layerwise_projectors.1.qformer.encoder.layer", 0, 1)


def test_a_component_that_is_a_module_list_is_its_own_stack():
    """Qwen3-VL's deepstack mergers: the projector root is the list, its elements the layers."""
    model = meta_model("qwen3_vl")
    mergers = "model.visual.deepstack_merger_list"
    length = len(dict(model.named_modules())[mergers])
    assert length > 1
    assert _slot(model, "projector", f"{mergers}.1.linear_fc1") == (mergers, 1, length)
    assert _slot(model, "vision", "model.visual.blocks.1.attn.qkv")[:2] == ("model.visual.blocks", 1)


def test_cross_attention_counts_in_the_language_stack():
    model = meta_model("mllama")
    name = "model.language_model.layers.3.cross_attn.q_proj"
    layers = len(dict(model.named_modules())["model.language_model.layers"])
    assert _slot(model, "cross_attention", name) == ("model.language_model.layers", 3, layers)


def test_modules_outside_numbered_stacks_have_no_slot():
    model = HandRolledVLM()
    model.bridge = nn.Linear(8, 8)  # a projector that is one linear: it is its own root
    assert _slot(model, "projector", "bridge") is None
    assert _slot(model, "projector", "mm_projector.2") == ("mm_projector", 2, 3)
    assert _slot(model, "vision", "language_model.layers.1") is None  # not under the component's root
    assert _slot(model, "vision", "vision_tower.layers.1") == ("vision_tower.layers", 1, 2)
    assert _slot(model, "vision", "vision_tower.layers.1", patterns=["blocks"]) is None


def test_a_stack_in_any_container_has_its_real_length():
    """Remote code may keep its layers in a ModuleDict or a plain module: the length is its numbered children,
    so negative indices count from the real end."""
    model = HandRolledVLM()
    model.vision_tower.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
    model.language_model.layers = nn.Module()
    for i in range(3):
        model.language_model.layers.add_module(str(i), nn.Linear(8, 8))
    assert _slot(model, "vision", "vision_tower.layers.1") == ("vision_tower.layers", 1, 4)
    assert _slot(model, "language", "language_model.layers.0", patterns=["layers"]) == ("language_model.layers", 0, 3)
