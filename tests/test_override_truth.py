"""Run the ten override types' own code to check their hand-written truth, without reading either table.

The resolver corrects ten model types by hand (``OVERRIDES`` in ``resolve/components.py``); their entries in
``zoo_wide_truth.py`` are written from the transformers modelling source. Agreement between two hand-written tables
proves little, so here each tiny random-init model runs its *own* image path (``get_image_features``, or its
``forward`` stopped where the image features enter the text stack) with a hook on every ``nn.Linear``, then
back-propagates from the image features:

- the linears the gradient reaches are exactly the truth's vision + projector (+ Q-Former) linears;
- a linear that ran there but feeds nothing (a pooling head whose output is never read, a VQ codebook scored by an
  argmax) is one the truth never targets;
- no language, cross-attention or audio linear runs on the image path;
- the projector's linears run after the last vision linear, and the features leave through one of them. Where the
  boundary between tower and projector lies is read from the code; running it checks only this order.

Every override type gets this check: UDOP's says that no linear runs before the shared encoder (no vision tower, no
projector), and VisionEncoderDecoder's ``enc_to_dec_proj`` (absent from the tiny model, whose widths match) is run in
a variant with a wider decoder.

A second check runs the whole model with an image and back-propagates from the logits: every linear the truth
targets must receive gradient (no dead adapter), except the one case the truth documents (DiffusionGemma's encoder
keeps only its KV cache). Gradient *reaching* a module's output is what counts, not its value: Evolla's and Idefics'
tanh gates start at zero. The only input a type's model needs beyond sizes is an image token id inside the tiny
vocabulary (Janus, DeepSeek-VL hybrid, Ovis 2 and DiffusionGemma default to ids of the full-size tokenizer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from zoo_wide_truth import TRUTH, expected_sets, is_embedding, is_head, is_router_name

from peft_vision_lora import VisionLoraConfig, compile_targets
from peft_vision_lora.resolve.components import resolve_components
from peft_vision_lora.zoo.catalog import model_class, zoo_config

OVERRIDE_TYPES = (
    "vision-encoder-decoder",
    "udop",
    "git",
    "janus",
    "deepseek_vl_hybrid",
    "apertus1p5",
    "idefics",
    "diffusion_gemma",
    "ovis2",
    "evolla",
)
IMAGE = 32  # image_size of every tiny vision config here
IMAGE_TOKEN = 500  # inside the tiny 512-token vocabulary, for the types whose default id is outside it
# Config changes a forward pass needs beyond zoo_config's sizes: nothing but an image token id inside the vocabulary.
_FORWARD_OVERRIDES = {
    t: {"image_token_id": IMAGE_TOKEN} for t in ("janus", "deepseek_vl_hybrid", "ovis2", "diffusion_gemma")
}


class _Stop(Exception):
    """Raised by a pre-hook once the image features reach the text stack: the rest of the forward is not the image
    path."""


def build(model_type: str) -> nn.Module:
    """The zoo's tiny model (a few overrides so a forward pass runs), every parameter trainable (Idefics freezes its
    towers by default, which would hide them from the gradient)."""
    config = zoo_config(model_type, **_FORWARD_OVERRIDES.get(model_type, {}))
    torch.manual_seed(0)
    model = model_class(model_type)._from_config(config, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


@dataclass
class Trace:
    ran: list[str]  # nn.Linear modules that ran, in the order of their first call
    reached: set[str]  # modules (with parameters of their own) whose output the gradient reached


def trace(model: nn.Module, run: Callable[[], torch.Tensor]) -> Trace:
    """Run ``run`` with hooks on every module holding parameters, then back-propagate from its result."""
    ran, reached, handles = [], set(), []

    def hook(module, args, output, name):
        if type(module) is nn.Linear and name not in ran:
            ran.append(name)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: reached.add(name))

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(functools.partial(hook, name=name)))
    try:
        with torch.enable_grad():
            result = run()
            if result.requires_grad:
                result.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return Trace(ran, reached)


def stopped_at(module: nn.Module, run: Callable[[], object], pick: Callable[[tuple, dict], torch.Tensor]):
    """A runner for ``trace``: run ``run`` until ``module`` is about to be called, and return what ``pick`` takes
    from its arguments (the image features as the text stack receives them)."""

    def runner() -> torch.Tensor:
        captured = {}

        def pre_hook(mod, args, kwargs):
            captured["features"] = pick(args, kwargs)
            raise _Stop

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            run()
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["features"]

    return runner


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _diffusion_gemma_patches() -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4's vision tower takes flattened 8x8x3 patches and their (x, y) positions: a 6x6 grid, pooled 3x3 into
    4 soft tokens."""
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"), -1).reshape(1, 36, 2)
    return _pixels(1, 36, 192), grid


# The model's own image path, per type: what get_image_features (or forward) hands the text stack.
# vision-encoder-decoder, git, udop, idefics have no get_image_features: their forward runs until the text stack
# is called with the image features.
def _image_path(model_type: str, model: nn.Module) -> Callable[[], torch.Tensor]:
    ids = torch.tensor([[5, 6, 7]])
    if model_type == "vision-encoder-decoder":  # VisionEncoderDecoderModel.forward -> decoder(encoder_hidden_states)
        return stopped_at(
            model.decoder,
            lambda: model(pixel_values=_pixels(1, 3, IMAGE, IMAGE), decoder_input_ids=ids),
            lambda args, kwargs: kwargs["encoder_hidden_states"],
        )
    if model_type == "git":  # GitModel.forward -> encoder(projected image tokens + text embeddings)
        return stopped_at(
            model.git.encoder,
            lambda: model(input_ids=ids, pixel_values=_pixels(1, 3, IMAGE, IMAGE)),
            lambda args, kwargs: args[0],
        )
    if model_type == "udop":  # UdopStack.forward: patch embeddings join the text at the encoder's first block
        bbox = torch.tensor([[[0.1, 0.1, 0.2, 0.2]] * 3])
        return stopped_at(
            model.encoder.block[0],
            lambda: model(input_ids=ids, bbox=bbox, pixel_values=_pixels(1, 3, IMAGE, IMAGE), decoder_input_ids=ids),
            lambda args, kwargs: args[0],
        )
    if model_type == "idefics":  # IdeficsModel.forward -> gated_cross_attn_layers[0](..., image_hidden_states)
        return stopped_at(
            model.model.gated_cross_attn_layers[0],
            lambda: model(
                input_ids=ids,
                pixel_values=_pixels(1, 1, 3, IMAGE, IMAGE),
                image_attention_mask=torch.ones(1, 3, 1, dtype=torch.long),
            ),
            lambda args, kwargs: args[2],
        )
    if model_type == "evolla":  # EvollaModel.forward -> protein_encoder(...).sequence_compressor_output
        protein = torch.randint(5, 400, (1, 6), generator=torch.Generator().manual_seed(1))
        encoder = model.model.protein_encoder
        return lambda: encoder(input_ids=protein, attention_mask=torch.ones_like(protein)).sequence_compressor_output
    if model_type == "apertus1p5":  # codes -> text embedding table; pooler_output is one tensor per image
        return lambda: torch.cat(
            model.model.get_image_features(_pixels(1, 3, IMAGE, IMAGE), torch.tensor([[IMAGE, IMAGE]])).pooler_output
        )
    if model_type == "deepseek_vl_hybrid":
        low, high = _pixels(1, 3, IMAGE, IMAGE), _pixels(1, 3, IMAGE, IMAGE)
        return lambda: model.model.get_image_features(low, high).pooler_output
    if model_type == "diffusion_gemma":
        patches, positions = _diffusion_gemma_patches()
        return lambda: model.model.encoder.get_image_features(patches, positions).pooler_output
    # janus, ovis2: get_image_features(pixel_values).pooler_output
    return lambda: model.model.get_image_features(_pixels(1, 3, IMAGE, IMAGE)).pooler_output


def _image_tokens(count: int) -> torch.Tensor:
    return torch.tensor([[5] + [IMAGE_TOKEN] * count + [6, 7]])


# A whole forward pass with an image, per type; returns the logits.
def _full_forward(model_type: str, model: nn.Module) -> Callable[[], torch.Tensor]:
    ids = torch.tensor([[5, 6, 7]])
    image = _pixels(1, 3, IMAGE, IMAGE)
    if model_type == "vision-encoder-decoder":
        return lambda: model(pixel_values=image, decoder_input_ids=ids).logits
    if model_type == "git":
        return lambda: model(input_ids=ids, pixel_values=image).logits
    if model_type == "udop":
        bbox = torch.tensor([[[0.1, 0.1, 0.2, 0.2]] * 3])
        return lambda: model(input_ids=ids, bbox=bbox, pixel_values=image, decoder_input_ids=ids).logits
    if model_type == "idefics":
        mask = torch.ones(1, 3, 1, dtype=torch.long)
        return lambda: model(input_ids=ids, pixel_values=image[:, None], image_attention_mask=mask).logits
    if model_type == "evolla":
        protein = torch.randint(5, 400, (1, 6), generator=torch.Generator().manual_seed(1))
        return lambda: (
            model(input_ids=ids, protein_input_ids=protein, protein_attention_mask=torch.ones_like(protein)).logits
        )
    if model_type == "apertus1p5":  # 32x32 pixels -> a 2x2 code grid
        tokens = torch.tensor([[5] + [model.config.image_token_id] * 4 + [6]])
        return lambda: model(input_ids=tokens, pixel_values=image, image_sizes=torch.tensor([[IMAGE, IMAGE]])).logits
    if model_type == "deepseek_vl_hybrid":  # 16 SigLIP patches, the SAM path resized onto the same grid
        return lambda: model(input_ids=_image_tokens(16), pixel_values=image, high_res_pixel_values=image).logits
    if model_type == "diffusion_gemma":
        patches, positions = _diffusion_gemma_patches()
        return lambda: (
            model(
                input_ids=_image_tokens(4), pixel_values=patches, image_position_ids=positions, decoder_input_ids=ids
            ).logits
        )
    return lambda: model(input_ids=_image_tokens(16), pixel_values=image).logits  # janus, ovis2: 16 patches


def _targetable(names: set[str]) -> set[str]:
    return {n for n in names if not (is_embedding(n) or is_head(n) or is_router_name(n))}


def _linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("model_type", OVERRIDE_TYPES)
def test_image_path_runs_exactly_the_truths_vision_and_projector(model_type):
    model = build(model_type)
    sets = expected_sets(model, model_type)
    seen = trace(model, _image_path(model_type, model))
    fed = seen.reached & _linears(model)
    bridge = sets["vision"] | sets["projector"] | sets["qformer"]
    assert _targetable(fed) == bridge, f"{model_type}: the image features come from other linears than the truth says"
    assert set(seen.ran) - fed <= sets["untargeted"], f"{model_type}: linears that run but feed nothing are targets"
    text_side = sets["language"] | sets["cross_attention"] | sets["audio"]
    assert not set(seen.ran) & text_side, f"{model_type}: text-side linears ran on the image path"
    # The projector maps the tower's output: it starts after the last vision linear and makes the features.
    path = [n for n in seen.ran if n in bridge]
    if sets["projector"]:
        assert max(map(path.index, sets["vision"]), default=-1) < min(map(path.index, sets["projector"]))
        assert path[-1] in sets["projector"], f"{model_type}: the image features leave through {path[-1]}"


def test_the_cases_the_image_path_decides():
    """The three readings of the modelling code that disagreed with the override table, seen at run time."""
    dead = {
        "vision-encoder-decoder": {"encoder.pooler.dense"},  # ViTPooler: pooler_output is never read
        "deepseek_vl_hybrid": {"model.vision_model.head.mlp.fc1", "model.vision_model.head.mlp.fc2"},  # SigLIP head
        "apertus1p5": {"model.vision_tokenizer.quantize.embedding"},  # scores the codebook for an argmax
    }
    for model_type, linears in dead.items():
        model = build(model_type)
        seen = trace(model, _image_path(model_type, model))
        assert linears <= set(seen.ran) and not linears & seen.reached, model_type
    # Ovis 2's visual embedding table turns the visual-vocabulary probabilities into text-width embeddings: the
    # gradient of the image features reaches it, so finetune_projector='full' must train it.
    model = build("ovis2")
    assert "model.visual_embeddings_table" in trace(model, _image_path("ovis2", model)).reached
    assert "model.visual_embeddings_table" in TRUTH["ovis2"]["projector"]


def test_apertus_audio_tokenizer_passes_no_gradient():
    """Apertus1p5Model.get_audio_features: WavTokenizer codes (integers, no graph), then the text embedding table."""
    model = build("apertus1p5")
    waveform, mask = _pixels(1, 1, 2400), torch.ones(1, 2400, dtype=torch.long)
    seen = trace(model, lambda: torch.cat(model.model.get_audio_features(waveform, mask).pooler_output))
    tokens = model.model.get_audio_tokens(waveform, mask)
    assert all(not t.is_floating_point() and t.grad_fn is None for t in tokens)
    assert not seen.ran and not _targetable(seen.reached & _linears(model))
    assert {"model.audio_tokenizer", "model.vision_tokenizer"} <= set(TRUTH["apertus1p5"]["excluded"])


# DiffusionGemmaModel.forward hands the decoder only the encoder's KV cache: the encoder's last layer's query,
# output projection and MLP feed encoder_last_hidden_state alone, which no loss reads (the truth's comment says so).
_NO_GRADIENT_BY_DESIGN = {
    "diffusion_gemma": {
        "model.encoder.language_model.layers.1.self_attn.q_proj",
        "model.encoder.language_model.layers.1.self_attn.o_proj",
        "model.encoder.language_model.layers.1.mlp.gate_proj",
        "model.encoder.language_model.layers.1.mlp.up_proj",
        "model.encoder.language_model.layers.1.mlp.down_proj",
    }
}


@pytest.mark.parametrize("model_type", OVERRIDE_TYPES)
def test_every_linear_the_truth_targets_gets_gradient(model_type):
    model = build(model_type)
    sets = expected_sets(model, model_type)
    targeted = set().union(*(sets[c] for c in ("vision", "projector", "language", "cross_attention", "qformer")))
    targeted |= sets["audio"]  # no override type has an audio tower with linears (Apertus' tokenizer is excluded)
    seen = trace(model, _full_forward(model_type, model))
    missing = targeted - seen.reached
    assert missing == _NO_GRADIENT_BY_DESIGN.get(model_type, set()), f"{model_type}: dead targets {sorted(missing)}"


def test_vision_encoder_decoder_projects_when_the_widths_differ():
    """enc_to_dec_proj exists only when encoder and decoder widths differ (not in the zoo's tiny model): then the
    image path runs through it, and it is the projector."""
    config = zoo_config("vision-encoder-decoder", decoder={"hidden_size": 48, "intermediate_size": 96})
    torch.manual_seed(0)
    model = model_class("vision-encoder-decoder")._from_config(config, dtype=torch.float32).eval()
    seen = trace(model, _image_path("vision-encoder-decoder", model))
    assert "enc_to_dec_proj" in seen.reached
    components = resolve_components(model)
    assert components["projector"] == ("enc_to_dec_proj",)
    assert components.component_of("encoder.pooler.dense") is None


def test_resolver_trains_the_ovis2_embedding_table_with_a_full_projector():
    plan = compile_targets(build("ovis2"), VisionLoraConfig(r=4, finetune_projector="full"))
    assert "model.visual_embeddings_table" in plan.modules_to_save
