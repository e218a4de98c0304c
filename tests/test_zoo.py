"""Component selection on every image-text-to-text model type transformers ships, against independent truth.

Ground truth is `zoo_wide_truth.py`, written by hand from each model's sub-configs and forward code; nothing here
reads the resolver's tables. Types that cannot be built here are listed with the reason (and skipped with it, so
`pytest -ra` prints them); a type that starts or stops building changes `test_unbuildable_types_fail_for_the_listed
_reason` or `test_every_listed_type_builds`, so none is skipped silently. The zoo-wide run is marked slow;
`FAST_ZOO_TYPES` keeps one model per hard case unmarked.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from zoo_wide_truth import TRUTH, UNBUILDABLE, expected_kind, expected_sets, is_router_name

from peft_vision_lora import ComponentResolutionError, VisionLoraConfig, VisionLoraConfigError, compile_targets
from peft_vision_lora.zoo.catalog import MAX_TINY_PARAMS, ZOO_MODEL_TYPES, ZooBuildError, build_zoo_model

# One model per hard case: deepstack mergers in the vision module (qwen3_vl), two vision towers (deepseek_vl_hybrid),
# a Q-Former (instructblip), a perceiver + gated cross-attention on a text-config-at-top model (idefics), an audio
# tower (qwen2_5_omni_thinker), an encoder-decoder with decoder cross-attention (florence2), an MoE language model
# with router linears (qwen3_5_moe), excluded action expert (pi0), a VQ tokenizer and no vision tower (chameleon).
FAST_ZOO_TYPES = (
    "qwen3_vl",
    "deepseek_vl_hybrid",
    "instructblip",
    "idefics",
    "qwen2_5_omni_thinker",
    "florence2",
    "qwen3_5_moe",
    "pi0",
    "chameleon",
)
BUILDABLE = tuple(t for t in ZOO_MODEL_TYPES if t not in UNBUILDABLE)
TOWERS = ("vision", "language", "cross_attention")


def _params(types=ZOO_MODEL_TYPES) -> list:
    params = []
    for t in types:
        marks = [] if t in FAST_ZOO_TYPES else [pytest.mark.slow]
        if t in UNBUILDABLE:
            marks.append(pytest.mark.skip(reason=f"cannot build {t} here: needs {UNBUILDABLE[t]}"))
        params.append(pytest.param(t, id=t, marks=marks))
    return params


@functools.cache
def meta_model(model_type: str) -> nn.Module:
    """Structure only: selection reads names and shapes, so the meta device costs no memory."""
    return build_zoo_model(model_type, device="meta")


@functools.cache
def truth(model_type: str) -> dict[str, set[str]]:
    return expected_sets(meta_model(model_type), model_type)


def select(model_type: str, **flags) -> set[str]:
    return {t.name for t in compile_targets(meta_model(model_type), VisionLoraConfig(r=4, **flags)).targets}


def union(sets: dict[str, set[str]], *components: str) -> set[str]:
    return set().union(*(sets[c] for c in components))


def test_truth_names_every_model_type():
    assert set(TRUTH) | set(UNBUILDABLE) == set(ZOO_MODEL_TYPES)
    assert not set(TRUTH) & set(UNBUILDABLE)
    assert len(ZOO_MODEL_TYPES) >= 90


@pytest.mark.parametrize("model_type", sorted(UNBUILDABLE))
def test_unbuildable_types_fail_for_the_listed_reason(model_type):
    with pytest.raises(ZooBuildError, match=UNBUILDABLE[model_type]):
        build_zoo_model(model_type, device="meta")


@pytest.mark.parametrize("model_type", _params(BUILDABLE))
def test_every_listed_type_builds(model_type):
    """A real random-init CPU model, small enough for tests (Inkling-like towers are capped by parameter count)."""
    model = build_zoo_model(model_type, seed=0)
    params = list(model.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) < MAX_TINY_PARAMS
    assert not model.training


@pytest.mark.parametrize("model_type", _params())
def test_vision_language_and_both(model_type):
    sets = truth(model_type)
    language = union(sets, "language", "cross_attention")  # cross-attention follows the language flag by default
    assert sets["language"], f"{model_type}: every model here has a language model"
    assert select(model_type, task="vqa") == language
    if sets["vision"]:
        assert select(model_type, task="domain_adaptation") == sets["vision"]
        assert select(model_type) == sets["vision"] | language
    else:  # no vision tower (VQ tokens, a linear patch embedding, a text-only class): said, not silently empty
        with pytest.raises(ComponentResolutionError, match="no vision tower"):
            select(model_type, task="domain_adaptation")


@pytest.mark.parametrize("model_type", _params())
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_attention_mlp_split(model_type, kind):
    sets = truth(model_type)
    model = meta_model(model_type)
    towers = [c for c in TOWERS if sets[c]]
    expected = {n for n in union(sets, *towers) if expected_kind(model, model_type, n) == kind}
    flags = {
        "finetune_vision_layers": bool(sets["vision"]),
        "finetune_attention_modules": kind == "attention",
        "finetune_mlp_modules": kind == "mlp",
    }
    if expected:
        assert select(model_type, **flags) == expected
    else:  # Inkling's MLPs are all fused experts: nothing to adapt, and the error says so
        with pytest.raises(VisionLoraConfigError, match="no linear layer matched"):
            select(model_type, **flags)


@pytest.mark.parametrize("model_type", _params())
def test_projector_and_qformer_flags(model_type):
    sets = truth(model_type)
    only = {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_projector": True}
    bridge = sets["projector"] | sets["qformer"]  # a Q-Former follows the projector flag unless set on its own
    if bridge:
        assert select(model_type, **only) == bridge
    elif TRUTH[model_type]["projector"]:  # a projector without linears (Gemma 3's bare weight matrix)
        with pytest.raises(VisionLoraConfigError, match="finetune_projector='full'"):
            select(model_type, **only)
    else:
        with pytest.raises(ComponentResolutionError, match="no projector"):
            select(model_type, **only)
    if sets["qformer"]:
        assert select(model_type, finetune_qformer=True) == union(
            sets, "vision", "language", "cross_attention", "qformer"
        )
        assert select(model_type, **only, finetune_qformer=False) == sets["projector"]


@pytest.mark.parametrize("model_type", _params(t for t in ZOO_MODEL_TYPES if TRUTH.get(t, {}).get("cross_attention")))
def test_cross_attention_flag(model_type):
    sets = truth(model_type)
    assert sets["cross_attention"]
    vision = {"finetune_vision_layers": bool(sets["vision"])}
    assert select(model_type, **vision, finetune_cross_attention=False) == sets["vision"] | sets["language"]
    cross_only = {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_cross_attention": True}
    assert select(model_type, **cross_only) == sets["cross_attention"]


@pytest.mark.parametrize("model_type", _params(t for t in ZOO_MODEL_TYPES if TRUTH.get(t, {}).get("audio")))
def test_audio_only_with_its_own_flag(model_type):
    sets = truth(model_type)
    projector = "full" if TRUTH[model_type]["projector"] else False
    everything_but_audio = select(
        model_type, finetune_vision_layers=bool(sets["vision"]), finetune_projector=projector
    )
    assert not everything_but_audio & sets["audio"]
    audio_only = {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_audio_layers": True}
    if sets["audio"]:
        assert select(model_type, **audio_only) == sets["audio"]
    else:  # Inkling's audio tower is an embedding table: no linear to adapt
        with pytest.raises(VisionLoraConfigError, match="no linear layer matched"):
            select(model_type, **audio_only)


@pytest.mark.parametrize("model_type", _params())
def test_everything_on_never_reaches_excluded_heads_embeddings_or_routers(model_type):
    sets = truth(model_type)
    flags = {
        "finetune_vision_layers": bool(sets["vision"]),
        "finetune_projector": bool(sets["projector"]),
        "finetune_qformer": bool(sets["qformer"]),
        "finetune_audio_layers": bool(sets["audio"]),
    }
    chosen = select(model_type, **flags)
    assert chosen == union(sets, "vision", "projector", "language", "cross_attention", "qformer", "audio")
    assert not chosen & (sets["untargeted"] | sets["routers"])


MOE_TYPES = ("qwen3_5_moe", "qwen4_exp", "diffusion_gemma", "llama4", "qwen3_vl_moe", "aria", "glm4v_moe")


@pytest.mark.parametrize("model_type", _params(MOE_TYPES))
def test_moe_routers_are_never_targeted(model_type):
    """Routed experts are fused 3-D parameters in transformers 5 (no nn.Linear); shared experts are MLP linears;
    routing linears (a ``router``'s projection, Qwen's ``shared_expert_gate``, Llama 4's Linear-subclass router)
    stay frozen under every flag."""
    model = meta_model(model_type)
    routers = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_router_name(n)}
    routers |= {
        n for n, m in model.named_modules() if type(m).__name__.endswith("Router") and isinstance(m, nn.Linear)
    }
    everything = select(model_type, finetune_projector=True)
    assert not everything & routers
    shared = {n for n in everything if ".shared_expert" in n}
    assert shared or model_type in ("qwen3_vl_moe", "diffusion_gemma"), f"{model_type}: shared experts not adapted"
    assert {n for n in shared if "attention" != expected_kind(model, model_type, n)} == shared
    if model_type in ("qwen3_5_moe", "diffusion_gemma", "llama4"):
        assert routers, f"{model_type} should have router linears to leave alone"


def test_moe_vlm_adapts_shared_experts_and_leaves_routing_alone():
    """On a real MoE VLM (Qwen3.5-MoE): routing linears stay plain modules, the adapted model computes what the base
    does at zero-initialised LoRA, and the loss gradient reaches the LoRA weights of the shared experts."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = build_zoo_model("qwen3_5_moe", seed=0)
    ids = torch.randint(3, 400, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = get_peft_model(model, VisionLoraConfig(r=4, task="vqa", kernel="torch"))
    modules = dict(peft_model.base_model.model.named_modules())
    gates = [n for n in modules if n.endswith("mlp.shared_expert_gate")]
    assert gates and not any(isinstance(modules[n], LoraLayer) for n in gates)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, base_logits)

    for module in modules.values():  # B = 0 hides A from the gradient: give B a value
        if isinstance(module, LoraLayer):
            nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    peft_model(**batch).loss.backward()
    shared = [m for n, m in modules.items() if isinstance(m, LoraLayer) and ".shared_expert." in n]
    assert shared
    assert all(m.lora_A["default"].weight.grad is not None for m in shared)
    assert any(m.lora_A["default"].weight.grad.abs().sum() > 0 for m in shared)
