"""Hand-written ground truth for every image-text-to-text model type transformers 5.24 registers.

Written by reading each model's sub-configs, its ``modeling_*.py`` (which modules ``get_image_features`` and
``forward`` run, and in what order) and the module tree of the tiny model ``zoo.catalog`` builds. Nothing
here calls the package's resolver. Prefixes are module paths of the top-level model; ``*`` matches one path element
(a layer index). A linear belongs to the component of its longest matching prefix; ``excluded`` prefixes belong to
no component (never targeted); linears under no prefix (output heads, PI0's action projections) are never targeted.

The ten types the resolver corrects by hand (``OVERRIDES`` in ``resolve/components.py``) have their truth written from
the modelling source, not from that table: the comment above each names the file, class and methods read, and
``test_override_truth.py`` runs each model's own image path to check which linears feed the image features.

Decisions a reader may not expect, all read from the forward code:
- Mergers inside the vision module are projector (Qwen2/2.5/3-VL ``visual.merger``, Qwen3-VL ``deepstack_merger_list``,
  Qwen3-Omni ``merger_list``, MiniCPM ``vit_merger``, HunYuan ``patch_merger``, Llama 4 ``vision_adapter``, Ovis 2's
  visual head): they map vision features to the text width, the tower's output is their input.
- Q-Formers are their own component ``qformer`` (BLIP-2, InstructBLIP, Granite 4 Vision's window Q-Formers inside its
  projectors). Perceiver resamplers are projector (Idefics, Idefics2's connector).
- Cross-attention: language-side blocks that read image features: Mllama ``cross_attn``, Idefics
  ``gated_cross_attn_layers`` (their MLP too: the block exists only to read the image), Evolla's protein adapters,
  BLIP's BERT ``crossattention``, and decoder cross-attention of encoder-decoder VLMs (Florence-2, PP-FormulaNet,
  Pix2Struct, UDOP, VisionEncoderDecoder) whose encoder output carries the image. T5Gemma 2 and DiffusionGemma merge
  cross-attention into self-attention: no separate block.
- VQ tokenizers (Chameleon, Emu3, Janus' generation path, Apertus 1.5's ``vision_tokenizer``, whose codebook is an
  argmax over a linear, and its WavTokenizer ``audio_tokenizer``) are excluded: quantisation passes no gradient.
  Janus' generation aligner/head predict image tokens: excluded. PI0's action expert (``dit``) is excluded.
- No vision tower at all: Fuyu and Gemma 4 unified (a linear patch embedding), UDOP (patches enter the shared T5
  encoder), Chameleon, Emu3 and Apertus 1.5 (VQ tokens), Mistral 4 (a text-only class in the mapping).
- Evolla is protein-text: its protein encoder takes the vision role.
- Audio: Qwen2.5-Omni / Qwen3-Omni / Dots3 / Muse Spark / Inkling audio towers and Gemma 4's ``embed_audio``.
- Pooling heads whose output the model never reads run but reach nothing: excluded (VisionEncoderDecoder's ViT
  ``encoder.pooler``, DeepSeek-VL hybrid's SigLIP ``vision_model.head``).
- Projectors without a linear: Gemma 3 (a bare weight matrix), HY-V4-VL's ``vision_tower.patch_merger`` (two
  convolutions to the text width, then an ``image_newline`` parameter).
- DeepSeek-style sparse-attention indexers (GLM-5 Next, Dots3, HY-V4-VL ``self_attn.indexer``) count as language
  attention, like the attention block they sit in.
- Inkling 2 Loop's message gates (``q/k/v/mlp_message_gate`` of the looped layers) blend the previous pass into a
  block's input: residual-stream mixers, neither attention nor MLP (like hyper-connections).
"""

from __future__ import annotations

import re

from torch import nn

COMPONENTS = ("vision", "projector", "language", "cross_attention", "qformer", "audio")


def _t(vision=(), projector=(), language=(), cross_attention=(), qformer=(), audio=(), excluded=()):
    return {
        "vision": tuple(vision),
        "projector": tuple(projector),
        "language": tuple(language),
        "cross_attention": tuple(cross_attention),
        "qformer": tuple(qformer),
        "audio": tuple(audio),
        "excluded": tuple(excluded),
    }


def _llava(vision="model.vision_tower", projector="model.multi_modal_projector", language="model.language_model"):
    return _t([vision], [projector], [language])


def _qwen(*projectors, audio=()):
    return _t(["model.visual"], projectors or ["model.visual.merger"], ["model.language_model"], audio=audio)


_BLIP2 = _t(["vision_model"], ["language_projection"], ["language_model"], qformer=["qformer"])
_QWEN3_VL = _qwen("model.visual.merger", "model.visual.deepstack_merger_list")
_MINICPM = _t(["model.vision_tower"], ["model.vision_tower.vit_merger", "model.merger"], ["model.language_model"])
_MUSE = dict(vision=["model.vision_tower"], projector=["model.vision_adapter", "model.vision_projection"])

TRUTH: dict[str, dict[str, tuple[str, ...]]] = {
    # apertus1p5/modeling_apertus1p5.py Apertus1p5Model:
    # - vision_tokenizer excluded: Apertus1p5Model.get_image_features -> get_image_tokens -> vision_tokenizer.encode,
    #   whose Apertus1p5VisionTokenizerVectorQuantizer.forward returns `logits.argmax(-1)` (its `quantize.embedding`
    #   linear scores the codebook); the codes are then looked up in language_model.embed_tokens. No gradient.
    # - audio_tokenizer excluded, for the same reason: get_audio_features -> get_audio_tokens -> audio_tokenizer.encode
    #   (WavTokenizerEncoderModel.encode, models/wavtokenizer/modeling_wavtokenizer.py) returns
    #   WavTokenizerEuclideanCodebook.quantize's `dist.max(-1).indices`, embedded with the text table again.
    # - language_model: Apertus1p5TextModel, fed the merged embeddings in Apertus1p5Model.forward.
    "apertus1p5": _t(language=["model.language_model"], excluded=["model.vision_tokenizer", "model.audio_tokenizer"]),
    "aria": _llava(),
    "aya_vision": _llava(),
    "blip": _t(["vision_model"], [], ["text_decoder"], ["text_decoder.bert.encoder.layer.*.crossattention"]),
    "blip-2": _BLIP2,
    "chameleon": _t(language=["model"], excluded=["model.vqmodel"]),
    "cohere2_vision": _llava(),
    "cohere_compass": _QWEN3_VL,
    "cosmos3_edge": _t(["model.visual"], ["model.projector"], ["model.language_model"]),
    "cosmos3_omni": _QWEN3_VL,
    "deepseek_ocr2": _llava(),
    "deepseek_vl": _llava("model.vision_model", "model.aligner"),
    # deepseek_vl_hybrid/modeling_deepseek_vl_hybrid.py DeepseekVLHybridModel.get_image_features:
    # - vision: get_low_res_image_features = vision_model(...).last_hidden_state (SigLIP); get_high_res_image_features
    #   = high_res_vision_model (SAM) -> high_res_vision_proj, plus hidden_states[global_attn_index + 1] ->
    #   high_res_vision_neck -> high_res_vision_proj (convolutions, scaled by high_res_vision_alpha).
    # - projector: aligner(low, high) (DeepseekVLHybridAligner: vision_proj, high_res_vision_proj, proj to text width).
    # - language: language_model, fed the scattered features in DeepseekVLHybridModel.forward.
    # - excluded: vision_model.head, SigLIP's attention-pooling head: it computes pooler_output, which
    #   get_low_res_image_features never reads (only last_hidden_state): it runs but reaches nothing.
    "deepseek_vl_hybrid": _t(
        [
            "model.vision_model",
            "model.high_res_vision_model",
            "model.high_res_vision_neck",
            "model.high_res_vision_proj",
        ],
        ["model.aligner"],
        ["model.language_model"],
        excluded=["model.vision_model.head"],
    ),
    # diffusion_gemma/modeling_diffusion_gemma.py DiffusionGemmaModel (encoder, decoder):
    # - vision: DiffusionGemmaEncoderModel.get_image_features: vision_tower(...).last_hidden_state -> embed_vision.
    # - projector: encoder.embed_vision (DiffusionGemmaMultimodalEmbedder: norm, embedding_projection to text width).
    # - language: encoder.language_model (DiffusionGemmaEncoderTextModel, fills the KV cache) and decoder
    #   (DiffusionGemmaDecoderModel: its layers, tied to the encoder's, read that cache; self_conditioning is a gated
    #   MLP on the decoder input). DiffusionGemmaModel.forward: only the encoder's cache reaches the decoder, so the
    #   encoder's last layer's q_proj/o_proj/MLP feed only encoder_last_hidden_state, which nothing reads (shown in
    #   test_override_truth; a dead-adapter rule of its own, not a component question: they stay language here).
    "diffusion_gemma": _t(
        ["model.encoder.vision_tower"],
        ["model.encoder.embed_vision"],
        ["model.encoder.language_model", "model.decoder"],
    ),
    "dots3_note": _t(
        ["model.vision_tower"], ["model.vision_tower.merger"], ["model.language_model"], audio=["model.audio_tower"]
    ),
    "emu3": _t(language=["model.text_model"], excluded=["model.vqmodel"]),
    "ernie4_5_vl_moe": _llava(projector="model.resampler_model"),
    # evolla/modeling_evolla.py (protein-text: the protein encoder takes the vision role):
    # - vision: EvollaProteinEncoder.forward: model (EvollaSaProtProteinEncoder).last_hidden_state, then
    # - projector: sequence_compressor_resampler (latent resampler, then protein_projector to the text width).
    # - language: EvollaModel itself holds embed_tokens, layers, norm (no text sub-model): the backbone `model`.
    # - cross_attention: EvollaDecoderLayer.adapter (EvollaSequenceAlignerCrossAttention) reads protein_kv_states
    #   after each selected layer's MLP; its `ff` is gated by gate_ffw and exists only for that block.
    "evolla": _t(
        ["model.protein_encoder.model"],
        ["model.protein_encoder.sequence_compressor_resampler"],
        ["model"],
        ["model.layers.*.adapter"],
    ),
    "exaone4_5": _qwen(),
    "florence2": _t(
        ["model.vision_tower"],
        ["model.multi_modal_projector"],
        ["model.language_model"],
        ["model.language_model.decoder.layers.*.encoder_attn"],
    ),
    "fuyu": _t(language=["model.language_model"]),
    "gemma3": _llava(),
    "gemma4": _t(
        ["model.vision_tower"],
        ["model.embed_vision"],
        ["model.language_model"],
        audio=["model.audio_tower", "model.embed_audio"],
    ),
    "gemma4_unified": _t([], ["model.embed_vision"], ["model.language_model"], audio=["model.embed_audio"]),
    # git/modeling_git.py GitModel.forward: image_encoder (GitVisionModel).last_hidden_state -> visual_projection
    # (GitProjection: Linear + LayerNorm to the text width) -> concatenated before the text embeddings -> encoder
    # (GitEncoder, the causal BERT-style text stack). The top config is the text config; `output` is the LM head.
    "git": _t(["git.image_encoder"], ["git.visual_projection"], ["git.encoder"]),
    "glm46v": _qwen(),
    "glm4v": _qwen(),
    "glm4v_moe": _qwen(),
    "glm5_next": _qwen(),
    "glm_ocr": _qwen(),
    "glmga": _qwen(),
    "got_ocr2": _llava(),
    "granite4_vision": _t(
        ["model.vision_tower"],
        ["model.layerwise_projectors", "model.spatial_projectors"],
        ["model.language_model"],
        qformer=["model.layerwise_projectors.*.qformer", "model.spatial_projectors.*.qformer"],
    ),
    "granite_docling": _t(["model.vision_model"], ["model.vision_model.connector"], ["model.text_model"]),
    "hunyuan_vl": _t(["model.vision_tower"], ["model.vision_tower.patch_merger"], ["model.language_model"]),
    "hyperclovax_vision_v2": _t(
        ["model.vision_model"], ["model.vision_model.merger", "model.projector"], ["model.language_model"]
    ),
    # idefics/modeling_idefics.py IdeficsModel.forward: vision_model (IdeficsVisionTransformer).last_hidden_state ->
    # perceiver_resampler (use_resampler, as the checkpoints set it; built without a config attribute) ->
    # image_hidden_states, read as keys/values by gated_cross_attn_layers[idx // cross_layer_interval], each run
    # before decoder layer idx (cross_attn then mlp, both tanh-gated: the block exists only to read the image). The
    # decoder layers, embed_tokens and norm sit on IdeficsModel itself (the top config is the text config).
    "idefics": _t(["model.vision_model"], ["model.perceiver_resampler"], ["model"], ["model.gated_cross_attn_layers"]),
    "idefics2": _t(["model.vision_model"], ["model.connector"], ["model.text_model"]),
    "idefics3": _t(["model.vision_model"], ["model.connector"], ["model.text_model"]),
    "hy_v4_vl": _t(["model.vision_tower"], ["model.vision_tower.patch_merger"], ["model.language_model"]),
    "inkling2": _t(["model.vision_tower"], ["model.vision_tower.merger"], ["model.language_model"]),
    "inkling2_loop": _t(["model.vision_tower"], ["model.vision_tower.merger"], ["model.language_model"]),
    "inkling_mm_model": _t(["model.vision_tower"], [], ["model.language_model"], audio=["model.audio_tower"]),
    "instructblip": _BLIP2,
    "instructblipvideo": _BLIP2,
    "internvl": _llava(),
    # janus/modeling_janus.py JanusModel:
    # - vision -> projector: get_image_features = vision_model(...).last_hidden_state -> aligner
    #   (JanusVisionAlignerMLP, to the text width); JanusModel.forward scatters it into language_model's input.
    # - excluded, the image-generation path, which JanusForConditionalGeneration.forward never runs: vqmodel
    #   (JanusVQVAE: argmin codes, decode only in decode_image_tokens), generation_aligner (only in
    #   prepare_embeddings_for_image_generation) and generation_head (only in generate, under torch.no_grad).
    "janus": _t(
        ["model.vision_model"],
        ["model.aligner"],
        ["model.language_model"],
        excluded=["model.vqmodel", "model.generation_aligner", "model.generation_head"],
    ),
    "kimi_k25": _llava(projector="model.mm_projector"),
    "kosmos-2": _t(["vision_model"], ["image_to_text_projection"], ["text_model"]),
    "kosmos-2.5": _t(["vision_model"], ["image_to_text_projection"], ["text_model"]),
    "lfm2_vl": _llava(),
    "lfm3_vl": _llava(),
    "lighton_ocr": _llava("model.vision_encoder", "model.vision_projection"),
    "llama4": _t(["vision_model"], ["vision_model.vision_adapter", "multi_modal_projector"], ["language_model"]),
    "llava": _llava(),
    "llava_next": _llava(),
    "llava_next_video": _llava(),
    "llava_onevision": _llava(),
    "minicpm_ocr": _MINICPM,
    "minicpmv4_6": _MINICPM,
    "minicpmv4_7": _MINICPM,
    "minimax_m3_vl": _llava(),
    "mistral3": _llava(),
    "mistral4": _t(language=["model"]),
    "mistral_large4": _llava(),
    "mllama": _t(
        ["model.vision_model"],
        ["model.multi_modal_projector"],
        ["model.language_model"],
        ["model.language_model.layers.*.cross_attn"],
    ),
    "molmo2": _llava(),
    "muse_glimmer": _t(**_MUSE, language=["model.language_model"]),
    "muse_spark": _t(**_MUSE, language=["model.language_model"], audio=["model.audio_tower"]),
    "nemotron_h_omni": _t(["vision_model"], ["multi_modal_projector"], ["language_model"]),
    # ovis2/modeling_ovis2.py Ovis2Model.get_image_features:
    # - vision: vision_tower.transformer (Ovis2VisionTransformer) -> last_hidden_state.
    # - projector: Ovis2VisionModel.forward: head_linear -> head_norm (logits over the visual vocabulary) -> softmax
    #   (default tokenize_function; the argmax variants are straight-through, so gradient passes) -> then
    #   Ovis2Model.visual_embeddings_table (Ovis2VisualEmbeddingTable: probabilities @ weight, to the text width).
    #   Head and table are together the map onto the text space; the table is an embedding, no linear, but
    #   finetune_projector='full' must train it.
    # - language: language_model.
    "ovis2": _t(
        ["model.vision_tower"],
        ["model.vision_tower.head_linear", "model.vision_tower.head_norm", "model.visual_embeddings_table"],
        ["model.language_model"],
    ),
    "paddleocr_vl": _t(["model.visual"], ["model.projector"], ["model.language_model"]),
    "paligemma": _llava(),
    "pi0": _t(
        ["model.vlm.vision_tower"],
        ["model.vlm.multi_modal_projector"],
        ["model.vlm.language_model"],
        excluded=["model.dit"],
    ),
    "pix2struct": _t(["encoder"], [], ["decoder"], ["decoder.layer.*.encoder_decoder_attention"]),
    "pp_chart2table": _llava(),
    "pp_formulanet": _t(
        ["model.encoder"],
        ["model.encoder.multi_modal_projector"],
        ["model.decoder"],
        ["model.decoder.layers.*.encoder_attn"],
    ),
    "qianfan_ocr": _llava(),
    "qwen2_5_omni_thinker": _qwen(audio=["model.audio_tower"]),
    "qwen2_5_vl": _qwen(),
    "qwen2_vl": _qwen(),
    "qwen3_5": _qwen(),
    "qwen3_5_moe": _qwen(),
    "qwen3_omni_moe_thinker": _qwen("model.visual.merger", "model.visual.merger_list", audio=["model.audio_tower"]),
    "qwen3_vl": _QWEN3_VL,
    "qwen3_vl_moe": _QWEN3_VL,
    "qwen4_exp": _qwen(),
    "shieldgemma2": _llava(),
    "smolvlm": _t(["model.vision_model"], ["model.connector"], ["model.text_model"]),
    "step3p7": _llava("model.vision_model"),
    "t5gemma2": _t(
        ["model.encoder.vision_tower"],
        ["model.encoder.multi_modal_projector"],
        ["model.encoder.text_model", "model.decoder"],
    ),
    # udop/modeling_udop.py UdopStack.forward: pixel_values -> embed_patches (UdopPatchEmbeddings, a Conv2d) ->
    # combine_image_text_embeddings: the patches join the text tokens at the input of the encoder UdopStack, so
    # there is no vision tower and no projector (no linear runs before encoder.block.0). Encoder and decoder are T5
    # stacks; the decoder's EncDecAttention (UdopLayerCrossAttention) reads the encoder output.
    "udop": _t([], [], ["encoder", "decoder"], ["decoder.block.*.layer.1.EncDecAttention"]),
    "unlimited_ocr": _llava(),
    "video_llama_3": _llava("model.vision_model", "model.projector"),
    "video_llava": _t(
        ["model.image_tower", "model.video_tower"], ["model.multi_modal_projector"], ["model.language_model"]
    ),
    "vipllava": _llava(),
    # vision_encoder_decoder/modeling_vision_encoder_decoder.py VisionEncoderDecoderModel.forward: encoder (a vision
    # model, ViT here) -> encoder_outputs[0], its last_hidden_state -> [enc_to_dec_proj, only built when the widths
    # differ and the decoder has no cross_attention_hidden_size: the projector; absent in the tiny model] ->
    # decoder's encoder_hidden_states, read by BERT's crossattention. The encoder's pooler (ViTPooler) computes
    # pooler_output, which the decoder never reads: excluded. decoder.cls.predictions.transform is the LM head's
    # transform, part of the decoder; its `decoder` linear is the output head.
    "vision-encoder-decoder": _t(
        ["encoder"], [], ["decoder"], ["decoder.bert.encoder.layer.*.crossattention"], excluded=["encoder.pooler"]
    ),
}

# Types that cannot be built in this environment, and the words their build error must contain.
UNBUILDABLE = {
    "fast_vlm": "timm",  # FastViTHD vision tower through TimmWrapperModel
    "gemma3n": "timm",  # MobileNet-V5 vision tower through TimmWrapperModel
    "perception_lm": "timm",  # Perception Encoder through TimmWrapperModel
}

# Linears that are embeddings (patch/position/token), never targets: path elements, read from the module trees.
_EMBEDDING_PARTS = {
    "embeddings",
    "patch_embed",
    "patch_embedding",
    "patch_embedder",
    "patch_dense",  # Gemma 4 unified: the encoder-free patch embedding
    "vision_embed_tokens",  # Fuyu: the linear patch embedding
    "embed_tokens",
    "embed_positions",
    "generation_embeddings",
}
# Output heads (tied or not): never targets.
_HEAD = re.compile(r"(^|\.)(lm_head|lm_head\.out_proj|cls\.predictions\.decoder)$|^output$")
# MoE routing linears, by name as read from the MoE blocks: DiffusionGemma's router.proj, Qwen's shared_expert_gate.
_ROUTER = re.compile(r"\.router(\.|$)|\.shared_expert_gate$")


def is_embedding(name: str) -> bool:
    return any(part in _EMBEDDING_PARTS for part in name.split("."))


def is_head(name: str) -> bool:
    return bool(_HEAD.search(name))


def is_router_name(name: str) -> bool:
    return bool(_ROUTER.search(name))


def _matches(name: str, prefix: str) -> bool:
    parts, want = name.split("."), prefix.split(".")
    return len(parts) >= len(want) and all(w == "*" or w == p for w, p in zip(want, parts))


def component_of(model_type: str, name: str) -> str | None:
    """The component of module ``name``: the longest matching truth prefix wins; None for excluded or unlisted."""
    best, best_len = None, -1
    for component, prefixes in TRUTH[model_type].items():
        for prefix in prefixes:
            size = prefix.count(".")
            if _matches(name, prefix) and size > best_len:
                best, best_len = component, size
    return None if best == "excluded" else best


def linears(model: nn.Module) -> list[str]:
    """Exactly ``nn.Linear``: subclasses are either routers that change ``forward`` (Llama 4) or the ``out_proj`` of
    ``nn.MultiheadAttention``, which reads it as a bare weight (a LoRA wrapper there would never run)."""
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


# Read from the transformers sources: LlavaModel.get_image_features (models/llava/modeling_llava.py) projects
# `image_outputs.hidden_states[vision_feature_layer]` (default -2), and so do LlavaNextModel, LlavaNextVideoModel,
# VideoLlavaModel (image and video towers) and Granite4VisionModel: the tower layers after that hidden state run but
# feed nothing, so no strategy targets them (issue 15's dead adapters). VipLlava reads a list that covers its layers.
FEATURE_LAYER_TYPES = ("llava", "llava_next", "llava_next_video", "video_llava", "granite4_vision")


def unreachable_layers(model: nn.Module, model_type: str) -> tuple[str, ...]:
    """``<tower>.encoder.layers.<i>`` prefixes of the layers after the hidden state the projector reads."""
    if model_type not in FEATURE_LAYER_TYPES:
        return ()
    modules = dict(model.named_modules())
    feature = model.config.vision_feature_layer
    dead = []
    for tower in TRUTH[model_type]["vision"]:
        layers = modules.get(f"{tower}.encoder.layers")
        if layers is None:
            continue
        read = feature % (len(layers) + 1)  # hidden_states has one entry more than the layers (the embeddings)
        dead += [f"{tower}.encoder.layers.{i}" for i in range(read, len(layers))]
    return tuple(dead)


def expected_sets(model: nn.Module, model_type: str) -> dict[str, set[str]]:
    """Targetable linears per component (no embeddings, heads or routers) plus ``routers`` and ``untargeted``."""
    sets: dict[str, set[str]] = {c: set() for c in (*COMPONENTS, "routers", "untargeted")}
    dead = tuple(f"{layer}." for layer in unreachable_layers(model, model_type))
    for name in linears(model):
        if is_router_name(name):
            sets["routers"].add(name)
            continue
        component = component_of(model_type, name)
        if component is None or is_embedding(name) or is_head(name) or name.startswith(dead):
            sets["untargeted"].add(name)
        else:
            sets[component].add(name)
    return sets


# Block names read from the modeling code. Token mixers that are not softmax attention count as attention (Mamba,
# LFM's short convolution ``conv``, gated-delta ``linear_attn``, Molmo's attention pooling).
_ATTENTION_BLOCKS = {
    "self_attn",
    "attn",
    "attention",
    "cross_attn",
    "crossattention",
    "encoder_attn",
    "x_attn",
    "window_attn",
    "channel_attn",
    "linear_attn",
    "SelfAttention",
    "EncDecAttention",
    "self_attention",
    "encoder_decoder_attention",
    "image_pooling_2d",
    "conv",
}
_MLP_BLOCKS = {
    "mlp",
    "ffn",
    "ff",
    "feed_forward",
    "feed_forward1",  # Gemma 4's Conformer audio layers: two macaron feed-forwards
    "feed_forward2",
    "intermediate",
    "output",
    "intermediate_query",
    "output_query",
    "DenseReluDense",
    "shared_experts",
    "shared_expert",
    "self_conditioning",  # DiffusionGemma: a gated MLP on the self-conditioning input
}
# Residual-stream mixers: hyper-connections, and Inkling 2 Loop's gates that blend the previous loop pass's message
# into the input of attention (q/k/v) and of the MLP.
_NEITHER_BLOCKS = {
    "attn_hyper_connection",
    "mlp_hyper_connection",
    "hyper_connection_mixer",
    "q_message_gate",
    "k_message_gate",
    "v_message_gate",
    "mlp_message_gate",
}
# OPT, BART and Whisper-style audio layers keep their MLP in the layer; Dots3's audio adapter is a bare fc1/fc2 MLP.
_MLP_LEAVES = {"fc1", "fc2"}


def _nemotron_kind(config, layer: int) -> str:
    """NemotronH names every block ``mixer``; the config's layer pattern says which is which."""
    block = config.get_text_config().layers_block_type[layer]
    return "mlp" if block in ("mlp", "moe") else "attention"


def expected_kind(model: nn.Module, model_type: str, name: str) -> str | None:
    """ "attention", "mlp" or None (neither), from the names of the enclosing blocks up to the layer index.

    An attention block anywhere in that chain wins (BERT's ``attention.output.dense`` is attention, its layer-level
    ``output.dense`` is MLP).
    """
    *ancestors, leaf = name.split(".")
    blocks = []
    for index in range(len(ancestors) - 1, -1, -1):
        if ancestors[index].isdigit():
            if model_type == "nemotron_h_omni" and ancestors[index + 1 : index + 2] == ["mixer"]:
                return _nemotron_kind(model.config, int(ancestors[index]))
            break
        blocks.append(ancestors[index])
    if any(block in _NEITHER_BLOCKS for block in blocks):
        return None
    if any(block in _ATTENTION_BLOCKS for block in blocks):
        return "attention"
    if any(block in _MLP_BLOCKS for block in blocks):
        return "mlp"
    if model_type == "evolla" and blocks[:1] == ["adapter"]:
        return "attention"  # Evolla's adapter: query/key/value over protein features (its MLP is adapter.ff)
    if leaf in _MLP_LEAVES:
        return "mlp"
    return None
