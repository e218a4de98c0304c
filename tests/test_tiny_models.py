"""The tiny zoo builds, runs a full image-text forward pass, is deterministic, and matches the hand-written truth."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from zoo_truth import (
    COMPONENTS,
    PROJECTOR_WITHOUT_LINEAR,
    ZOO_TRUTH,
    expected_kind,
    expected_linears,
    unreachable_vision_layers,
)

from peft_vision_lora.zoo.tiny import SUPPORTED_TINY_MODEL_TYPES, build_tiny_vlm, tiny_config, tiny_inputs

TYPES = SUPPORTED_TINY_MODEL_TYPES
MAX_PARAMS = 2_000_000


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads; on a loaded 2-core box two OpenMP threads cost ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_supported_types_match_truth_table():
    assert set(TYPES) == set(ZOO_TRUTH)
    assert len(TYPES) >= 14


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="Unsupported tiny model type"):
        tiny_config("not_a_vlm")


@pytest.mark.parametrize("model_type", TYPES)
def test_builds_small(model_type):
    # Build time is measured by benchmarks/startup.py: a timed assertion fails on a busy machine.
    model = build_tiny_vlm(model_type)
    assert model.config.model_type == model_type
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS


@pytest.mark.parametrize("model_type", TYPES)
def test_forward_goes_through_vision_and_projector(model_type):
    model = build_tiny_vlm(model_type)
    truth = ZOO_TRUTH[model_type]
    watched = [p for key in ("vision", "projector", "cross_attention", "qformer") for p in truth[key]]
    fired: set[str] = set()
    handles = [
        model.get_submodule(prefix).register_forward_hook(lambda *_, prefix=prefix: fired.add(prefix))
        for prefix in watched
    ]
    batch = tiny_inputs(model)
    out = model(**batch)
    for handle in handles:
        handle.remove()

    assert out.loss is not None and torch.isfinite(out.loss)
    assert fired == set(watched), f"never ran: {set(watched) - fired}"

    # The image reaches the logits, and the loss gradient reaches the vision tower and the projector.
    with torch.no_grad():
        shifted = model(**{**batch, "pixel_values": batch["pixel_values"] + 1.0}).logits
    assert (shifted - out.logits).abs().max() > 1e-6
    out.loss.backward()
    for component in ("vision", "projector", "cross_attention", "qformer"):
        names = expected_linears(model, model_type, component)
        if names:
            grads = [model.get_submodule(n).weight.grad for n in names]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {component}"


@pytest.mark.parametrize("model_type", TYPES)
def test_same_seed_same_model_and_inputs(model_type):
    first, again, other = build_tiny_vlm(model_type), build_tiny_vlm(model_type), build_tiny_vlm(model_type, seed=1)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))

    batch, batch_again = tiny_inputs(first, seed=3), tiny_inputs(model_type, seed=3)
    assert batch.keys() == batch_again.keys()
    for key in batch:
        torch.testing.assert_close(batch[key], batch_again[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(batch["pixel_values"], tiny_inputs(first, seed=4)["pixel_values"])


@pytest.mark.parametrize("model_type", TYPES)
def test_batch_shape_and_text_only(model_type):
    model = build_tiny_vlm(model_type)
    batch = tiny_inputs(model, batch_size=3, seq_len=5)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] > 5
    assert batch["input_ids"].max() < model.config.get_text_config().vocab_size
    torch.testing.assert_close(batch["labels"], batch["input_ids"])
    if model_type in ("blip-2", "kosmos-2"):
        with pytest.raises(ValueError, match="requires `pixel_values`"):
            tiny_inputs(model, with_images=False)
    else:
        text_only = tiny_inputs(model, seq_len=7, with_images=False)
        assert text_only["input_ids"].shape == (2, 7) and "pixel_values" not in text_only
        assert torch.isfinite(model(**text_only).loss)


def test_qwen_mrope_section_fits_head_dim():
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        text = tiny_config(model_type).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


def test_overrides_reach_sub_configs():
    config = tiny_config("llava", vision_feature_layer=-1, text_config={"num_hidden_layers": 3})
    assert config.vision_feature_layer == -1
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.hidden_size == 32


@pytest.mark.parametrize("model_type", TYPES)
def test_truth_table_matches_the_model(model_type):
    model = build_tiny_vlm(model_type)
    modules = dict(model.named_modules())
    truth = ZOO_TRUTH[model_type]
    for key, prefixes in truth.items():
        for prefix in prefixes:
            assert prefix in modules, f"{model_type}: {key} prefix {prefix!r} is not a module"

    sets = {c: expected_linears(model, model_type, c) for c in COMPONENTS}
    assert sets["vision"] and sets["language"]
    assert bool(sets["projector"]) == (model_type not in PROJECTOR_WITHOUT_LINEAR)
    assert bool(sets["cross_attention"]) == (model_type == "mllama")
    assert bool(sets["qformer"]) == (model_type == "blip-2")
    for (a, sa), (b, sb) in itertools.combinations(sets.items(), 2):
        assert not sa & sb, f"{model_type}: {a} and {b} share {sa & sb}"

    # Every nn.Linear is in exactly one component, except the output head and the vision layers after the one the
    # projector reads (they never reach the output: vision_feature_layer=-2 on the LLaVA family).
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    dead = tuple(f"{layer}." for layer in unreachable_vision_layers(model, model_type))
    expected_outside = {n for n in linears if n.endswith("lm_head") or n.startswith(dead)}
    assert linears - set().union(*sets.values()) == expected_outside
    assert bool(dead) == (model_type in ("llava", "llava_next", "video_llava"))

    # Every linear inside a vision/language/cross-attention/Q-Former block is an attention or an MLP linear.
    for component in ("vision", "language", "cross_attention", "qformer"):
        unkinded = {n for n in sets[component] if expected_kind(n) is None}
        assert not unkinded, f"{model_type}: {component} linears without a kind: {unkinded}"
    assert {expected_kind(n) for n in sets["cross_attention"]} <= {"attention"}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.visual.blocks.0.attn.qkv", "attention"),
        ("model.visual.merger.mlp.0", "mlp"),
        ("model.language_model.layers.1.cross_attn.k_proj", "attention"),
        ("qformer.encoder.layer.0.attention.output.dense", "attention"),
        ("qformer.encoder.layer.0.crossattention.attention.value", "attention"),
        ("qformer.encoder.layer.0.intermediate_query.dense", "mlp"),
        ("qformer.encoder.layer.0.output_query.dense", "mlp"),
        ("language_model.model.decoder.layers.0.fc1", "mlp"),
        ("model.vision_tower.transformer.layers.0.feed_forward.gate_proj", "mlp"),
        ("text_model.model.layers.0.ffn.fc2", "mlp"),
        ("image_to_text_projection.x_attn.q_proj", "attention"),
        ("image_to_text_projection.dense", None),
        ("model.multi_modal_projector", None),
        ("model.multi_modal_projector.linear_1", None),
        ("lm_head", None),
    ],
)
def test_expected_kind(name, kind):
    assert expected_kind(name) == kind
