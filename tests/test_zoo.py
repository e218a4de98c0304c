"""Component selection on every image-text-to-text model type transformers ships, against independent truth.

Ground truth is `zoo_wide_truth.py`, written by hand from each model's sub-configs and forward code; nothing here
reads the resolver's tables. Types that cannot be built here are listed with the reason (and skipped with it, so
`pytest -ra` prints them); a type that starts or stops building changes `test_unbuildable_types_fail_for_the_listed
_reason` or `test_every_listed_type_builds`, so none is skipped silently.

The installed transformers decides which types exist. A type it adds that has no truth yet is *structural only*: it
gets the generic invariants of `testing.zoo_invariants` (run on every type, truth or not), is listed by
`test_truth_covers_the_installed_model_types` and marked so in docs/coverage.md, and fails nothing merely by being new.
A truth type the installed transformers lacks (removed, or not added yet) is skipped with that reason. The zoo-wide
run is marked slow; `FAST_ZOO_TYPES` and the structural-only types stay unmarked.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers
from torch import nn
from zoo_wide_truth import TRUTH, UNBUILDABLE, expected_kind, expected_sets, is_router_name

import peft_vision_lora.resolve.targets as targets_module
import peft_vision_lora.testing.zoo_invariants as zoo_invariants
from peft_vision_lora import ComponentResolutionError, VisionLoraConfig, VisionLoraConfigError, compile_targets
from peft_vision_lora.resolve.components import ComponentMap, resolve_components
from peft_vision_lora.resolve.targets import TargetPlan
from peft_vision_lora.testing.zoo_invariants import structural_invariant_failures, zoo_type_status
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
INSTALLED = frozenset(ZOO_MODEL_TYPES)
# Hand-checked types: the installed ones in transformers' order, then those this transformers does not have.
HAND_CHECKED = tuple(t for t in ZOO_MODEL_TYPES if t in TRUTH or t in UNBUILDABLE) + tuple(
    sorted((set(TRUTH) | set(UNBUILDABLE)) - INSTALLED)
)
STRUCTURAL_ONLY = tuple(t for t in ZOO_MODEL_TYPES if t not in TRUTH and t not in UNBUILDABLE)
BUILDABLE = tuple(t for t in HAND_CHECKED if t not in UNBUILDABLE)
TOWERS = ("vision", "language", "cross_attention")


def _not_installed(model_type: str) -> str:
    return (
        f"{model_type} is not an image-text-to-text type of transformers {transformers.__version__} (removed, renamed "
        "or not added yet); its truth stays for the releases that have it"
    )


def _params(types=HAND_CHECKED) -> list:
    params = []
    for t in types:
        marks = [] if t in FAST_ZOO_TYPES else [pytest.mark.slow]
        if t not in INSTALLED:
            marks.append(pytest.mark.skip(reason=_not_installed(t)))
        elif t in UNBUILDABLE:
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


def test_truth_covers_the_installed_model_types():
    """Every installed type with truth runs its truth tests and every installed type the generic invariants; those
    without truth are listed (a warning in the summary); the truth still covers the great majority."""
    assert not set(TRUTH) & set(UNBUILDABLE)
    runs = {p.id for p in _params() if not any(mark.name == "skip" for mark in p.marks)}
    assert runs == {t for t in ZOO_MODEL_TYPES if t in TRUTH}, "every installed truth type runs its truth tests"
    assert [p.id for p in _structural_params()] == list(ZOO_MODEL_TYPES), "every installed type gets the invariants"
    assert len(ZOO_MODEL_TYPES) >= 90
    assert len(set(HAND_CHECKED) & INSTALLED) >= 0.9 * len(ZOO_MODEL_TYPES)
    if STRUCTURAL_ONLY:
        warnings.warn(
            f"transformers {transformers.__version__} has {len(STRUCTURAL_ONLY)} image-text-to-text type(s) without "
            f"hand-written truth, checked by the generic invariants only: {', '.join(STRUCTURAL_ONLY)}",
            stacklevel=1,
        )


@pytest.mark.parametrize("model_type", sorted(UNBUILDABLE))
def test_unbuildable_types_fail_for_the_listed_reason(model_type):
    if model_type not in INSTALLED:
        pytest.skip(_not_installed(model_type))
    with pytest.raises(ZooBuildError, match=UNBUILDABLE[model_type]):
        build_zoo_model(model_type, device="meta")
    assert not zoo_type_status(model_type).builds


@pytest.mark.parametrize("model_type", _params(BUILDABLE))
def test_every_listed_type_builds(model_type):
    """A real random-init CPU model, small enough for tests (Inkling-like towers are capped by parameter count)."""
    model = build_zoo_model(model_type, seed=0)
    params = list(model.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) < MAX_TINY_PARAMS
    assert not model.training


def _structural_params() -> list:
    """Every installed type: the structural-only ones unmarked (a new type is checked in the fast run)."""
    params = []
    for t in ZOO_MODEL_TYPES:
        marks = [] if t in FAST_ZOO_TYPES or t in STRUCTURAL_ONLY else [pytest.mark.slow]
        if t in UNBUILDABLE:
            marks.append(pytest.mark.skip(reason=f"cannot build {t} here: needs {UNBUILDABLE[t]}"))
        params.append(pytest.param(t, id=t, marks=marks))
    return params


@pytest.mark.parametrize("model_type", _structural_params())
def test_generic_invariants(model_type):
    """What holds on every VLM, with or without hand truth: see `testing.zoo_invariants`. A new type that
    does not build tiny yet is skipped with the build error (a type with truth must build)."""
    try:
        model = meta_model(model_type)
    except ZooBuildError as error:
        if model_type in TRUTH:
            raise
        pytest.skip(f"new model type {model_type} does not build tiny here, so it is unchecked: {error}")
    assert structural_invariant_failures(model_type, model) == []


def _resolver_with(monkeypatch, change) -> None:
    """Patch the resolver that `compile_targets` calls with ``change(ComponentMap) -> paths``."""
    real = targets_module.resolve_components

    def wrong(model):
        found = real(model)
        return ComponentMap(found.model_type, change(dict(found.paths)), found.how, found.excluded)

    monkeypatch.setattr(targets_module, "resolve_components", wrong)


def test_generic_invariants_fail_when_the_resolver_targets_the_lm_head(monkeypatch):
    """The invariants are tests, not formalities: a resolver that lets ``lm_head`` into the language model fails."""
    model = build_zoo_model("llava", device="meta")  # a private one: the cached models stay unpatched
    assert structural_invariant_failures("llava", model) == []
    monkeypatch.setattr(targets_module, "output_heads", lambda model: set())
    _resolver_with(monkeypatch, lambda paths: {**paths, "language": (*paths["language"], "lm_head")})
    failures = structural_invariant_failures("llava", model)
    assert any("output head: [lm_head]" in f for f in failures), failures
    assert any("language-only selects modules outside every language subtree: [lm_head]" in f for f in failures)


def test_generic_invariants_fail_when_the_resolver_swaps_the_towers(monkeypatch):
    _resolver_with(monkeypatch, lambda paths: {**paths, "vision": paths["language"], "language": paths["vision"]})
    failures = structural_invariant_failures("qwen3_vl", build_zoo_model("qwen3_vl", device="meta"))
    assert any(f.startswith("vision-only selects modules outside every vision subtree") for f in failures), failures
    assert any(f.startswith("language-only selects modules outside every language subtree") for f in failures)


def test_generic_invariants_fail_on_routers_and_patch_embeddings(monkeypatch):
    monkeypatch.setattr(targets_module, "is_router", lambda modules, name: False)
    failures = structural_invariant_failures("qwen3_5_moe", build_zoo_model("qwen3_5_moe", device="meta"))
    assert any("an MoE router: [model.language_model.layers.0.mlp.shared_expert_gate" in f for f in failures)
    monkeypatch.setattr(targets_module, "is_embedding_path", lambda name: False)
    failures = structural_invariant_failures("inkling2", build_zoo_model("inkling2", device="meta"))
    assert any("an embedding: [model.vision_tower.embeddings.patch_embedding]" in f for f in failures), failures


def test_generic_invariants_fail_when_a_flag_selects_nothing_silently(monkeypatch):
    """Chameleon has no vision tower: vision-only must raise, not hand back an empty plan."""
    real = zoo_invariants.compile_targets

    def silent(model, config, components=None):
        try:
            return real(model, config, components)
        except (VisionLoraConfigError, ComponentResolutionError):
            return TargetPlan((), "^$", {}, {}, (), resolve_components(model))

    monkeypatch.setattr(zoo_invariants, "compile_targets", silent)
    failures = structural_invariant_failures("chameleon", build_zoo_model("chameleon", device="meta"))
    assert "vision: compile_targets selected nothing and raised nothing" in failures, failures


def test_zoo_type_status_reports_builds_and_components():
    status = zoo_type_status("qwen2_vl")
    assert status.builds and status.error is None and 0 < status.parameters < MAX_TINY_PARAMS
    assert status.components["vision"] == ("model.visual",)
    assert status.components["projector"] == ("model.visual.merger",)
    assert status.components["language"] == ("model.language_model",)
    assert zoo_type_status("apertus1p5").excluded == ("model.audio_tokenizer", "model.vision_tokenizer")
    assert not {"vision", "audio"} & set(zoo_type_status("apertus1p5").components)


def test_apertus_vision_only_refuses_clearly():
    """Apertus 1.5 sees images through a VQ tokenizer (argmax codes, no gradient): vision-only names the reason."""
    with pytest.raises(ComponentResolutionError, match="no vision tower.*excluded=\\[.*'model.vision_tokenizer'\\]"):
        select("apertus1p5", task="domain_adaptation")


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
