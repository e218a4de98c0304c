"""QLoRA on CPU: a tiny LLaVA saved locally, reloaded in 4-bit (NF4) and 8-bit (LLM.int8) with bitsandbytes.

Checks that quantized linears are selected exactly like unquantized ones, that every strategy trains, that adapters
round-trip onto a freshly quantized base (identical logits) and onto the unquantized base (close: see
`test_adapter_round_trip`), what merging loses, and that the memory arithmetic matches what bitsandbytes allocates.
"""

import pytest
import torch
from helpers import shared_model
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForImageTextToText

from peft_vision_lora import VisionLoraConfig, compile_targets, explain
from peft_vision_lora.integrations.quantization import (
    disable_bnb_cpu_packing,
    high_precision_modules,
    is_quantized_linear,
    prepare_vlm_for_kbit_training,
    vlm_bnb_config,
)
from peft_vision_lora.reports.memory import quantized_footprint
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
    pytest.mark.filterwarnings("ignore:Merge lora module to:UserWarning"),  # PEFT, once per layer; ours says more
]

BITS = (4, 8)
STRATEGIES = {
    "vision+language": {"finetune_vision_layers": True, "finetune_language_layers": True, "finetune_projector": True},
    "language": {"finetune_vision_layers": False},
    "vision": {"finetune_language_layers": False},
}
# Hand-checked skip lists (component paths plus transformers' own defaults such as the output head).
HIGH_PRECISION = {
    "llava": ["lm_head", "model.multi_modal_projector", "model.vision_tower"],
    "qwen2_vl": ["lm_head", "model.visual"],  # the merger (projector) lives inside model.visual
    "mllama": ["lm_head", "model.multi_modal_projector", "model.vision_model"],
}


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_vlm("llava", seed=0).save_pretrained(path)
    return path


def _load(path, bits: int, keep=()) -> torch.nn.Module:
    """The saved model in k-bit; keep=() quantizes every linear transformers would (all but lm_head)."""
    config = vlm_bnb_config(path, bits=bits, keep_high_precision=keep, compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config, device_map="cpu")
    disable_bnb_cpu_packing(model)  # hidden size 32 < bnb's 64-value block: its CPU eval kernel cannot run it
    return model


def _train(model, batch, steps: int = 6, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _linears(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ---- which parts stay in high precision ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(HIGH_PRECISION))
def test_high_precision_modules_from_model_config_or_meta(model_type):
    model = shared_model(model_type)
    assert high_precision_modules(model) == HIGH_PRECISION[model_type]
    assert high_precision_modules(model.config) == HIGH_PRECISION[model_type]  # built on the meta device


def test_high_precision_is_configurable():
    model = shared_model("qwen2_vl")
    assert high_precision_modules(model, keep=("projector",)) == ["lm_head", "model.visual.merger"]
    assert high_precision_modules(model, keep=()) == ["lm_head"]
    with pytest.raises(ValueError, match="Unknown component"):
        high_precision_modules(model, keep=("visoin",))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        vlm_bnb_config(model, bits=3)


@pytest.mark.parametrize("bits", BITS)
def test_default_config_quantizes_only_the_language_model(saved_vlm, bits):
    config = vlm_bnb_config(saved_vlm, bits=bits, compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(saved_vlm, quantization_config=config, device_map="cpu")
    quantized = {n for n, m in _linears(model).items() if is_quantized_linear(m)}
    for name, module in _linears(model).items():
        in_language = name.startswith("model.language_model.")
        assert (name in quantized) == in_language, name
        if not in_language:
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert len(quantized) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


# ---- selection and paths ---------------------------------------------------------------------------------------


def _bnb_linear_classes() -> list[type]:
    import bitsandbytes as bnb

    class SubclassedNF4(bnb.nn.LinearNF4):  # a user subclass outside bitsandbytes: PEFT dispatches by isinstance
        pass

    found = {c for c in vars(bnb.nn).values() if isinstance(c, type) and issubclass(c, torch.nn.Linear)}
    return [*sorted(found, key=lambda c: c.__name__), SubclassedNF4]


@pytest.mark.parametrize("cls", _bnb_linear_classes(), ids=lambda c: c.__name__)
def test_quantized_candidates_are_exactly_what_peft_can_wrap(cls):
    """One rule: a bitsandbytes linear is a LoRA candidate iff PEFT's bnb dispatchers build a LoRA layer for it
    (Linear4bit, Linear8bitLt and their subclasses); others (OutlierAwareLinear) are never selected."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import dispatch_bnb_4bit, dispatch_bnb_8bit

    from peft_vision_lora.resolve.module_kinds import is_candidate_linear

    module, config = cls(64, 64), LoraConfig(r=2)
    wrapped = dispatch_bnb_4bit(module, "default", config, loaded_in_4bit=True, r=2) or dispatch_bnb_8bit(
        module, "default", config, loaded_in_8bit=True, r=2
    )
    assert is_candidate_linear(module) == is_quantized_linear(module) == (wrapped is not None)
    if cls.__name__ == "OutlierAwareLinear":  # bitsandbytes 0.50's one nn.Linear subclass PEFT has no layer for
        assert wrapped is None


@pytest.mark.parametrize("bits", BITS)
def test_selection_is_identical_to_the_unquantized_model(saved_vlm, bits):
    quantized = _load(saved_vlm, bits)
    assert sum(is_quantized_linear(m) for m in quantized.modules()) == 28  # every linear but lm_head
    config = dict(r=4, component_r={"vision": 2}, finetune_projector=True)
    plan_q = compile_targets(quantized, VisionLoraConfig(**config))
    plan = compile_targets(build_tiny_vlm("llava"), VisionLoraConfig(**config))
    assert plan_q.targets == plan.targets
    assert plan_q.target_regex == plan.target_regex and plan_q.rank_pattern == plan.rank_pattern

    model = get_peft_model(quantized, VisionLoraConfig(**config))
    rows = explain(model, show=False)
    assert [(r.module, r.component, r.rank) for r in rows] == [(t.name, t.component, t.r) for t in plan.targets]
    assert {r.path for r in rows} == {f"peft-bnb{bits}"}


def test_explain_shows_both_paths_on_a_mixed_base(saved_vlm):
    model = get_peft_model(_load(saved_vlm, 4, keep=("vision", "projector")), VisionLoraConfig(r=4))
    paths = {r.component: r.path for r in explain(model, show=False)}
    assert paths["language"] == "peft-bnb4"
    assert not paths["vision"].startswith("peft-bnb")  # a plain fp32 linear: our layer's own path


# ---- training --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("bits", BITS)
def test_each_strategy_trains_on_a_kbit_base(saved_vlm, bits, strategy):
    model = get_peft_model(_load(saved_vlm, bits), VisionLoraConfig(r=8, lora_alpha=16, **STRATEGIES[strategy]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # lr 5e-3: at 1e-2 AdamW overshoots on the 4-bit base by the sixth step (loss back above its start)
    losses = _train(model, tiny_inputs("llava", seed=1), lr=5e-3)
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in model.named_parameters():  # quantized and high-precision base weights are untouched
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_prepare_keeps_vision_lora_gradients_under_checkpointing(saved_vlm, use_reentrant):
    """Vision LoRA grads on a 4-bit base with gradient checkpointing equal the grads without it."""
    batch = tiny_inputs("llava", seed=2)
    grads = []
    for checkpointing in (True, False):
        model = prepare_vlm_for_kbit_training(
            _load(saved_vlm, 4),
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
        )
        assert model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)  # same adapter init in both models; B random too, so A gets gradients
        model = get_peft_model(model, VisionLoraConfig(r=4, init_lora_weights=False))
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    checkpointed, plain = grads
    assert set(checkpointed) == set(plain)
    # LLaVA reads the vision tower's second-to-last layer (vision_feature_layer=-2): its last layer gets no gradient
    vision = [n for n in plain if ".vision_tower.encoder.layers.0." in n]
    assert len(vision) == 2 * 6  # (q, k, v, out, fc1, fc2) x (A, B)
    for name in vision:
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None and ".vision_tower.encoder.layers.1." in name, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


# ---- save / load / merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_adapter_round_trip(saved_vlm, tmp_path, bits):
    """Onto a freshly quantized base: identical logits. Onto the unquantized base: close, in this sense:

    the mean |logit difference| is at most the base model's own quantization gap (mean |base_q - base|; measured
    here about 0.03 for NF4, 7e-4 for int8, with the adapter gap 0.009 / 8e-5) and under 10% of what the adapter
    changes, and the loss the adapter gained on the quantized base is at least half kept.
    """
    batch = tiny_inputs("llava", seed=1)
    torch.manual_seed(0)
    model = get_peft_model(_load(saved_vlm, bits), VisionLoraConfig(r=8, lora_alpha=16, finetune_projector=True))
    _train(model, batch)
    model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        trained = model(**batch)
        with model.disable_adapter():
            quantized_base = model(**batch)

    reloaded = PeftModel.from_pretrained(_load(saved_vlm, bits), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained.logits, rtol=0, atol=0)

    unquantized = build_tiny_vlm("llava", seed=0)
    with torch.no_grad():
        base = unquantized(**batch)
        on_full = PeftModel.from_pretrained(unquantized, tmp_path).eval()(**batch)
    gap = (on_full.logits - trained.logits).abs().mean()
    assert gap <= (base.logits - quantized_base.logits).abs().mean()
    assert gap < 0.1 * (trained.logits - quantized_base.logits).abs().mean()
    assert base.loss - on_full.loss > 0.5 * (quantized_base.loss - trained.loss) > 0


@pytest.mark.parametrize("bits", BITS)
def test_merge_into_a_quantized_base_warns_what_is_lost(saved_vlm, bits):
    batch = tiny_inputs("llava", seed=1)
    model = get_peft_model(_load(saved_vlm, bits), VisionLoraConfig(r=8, lora_alpha=16))
    _train(model, batch, steps=3)
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
    with pytest.warns(UserWarning, match=r"re-quantized.*load the base unquantized"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert sum(is_quantized_linear(m) for m in merged.modules()) == 28  # still a k-bit model
    disable_bnb_cpu_packing(merged)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    assert not torch.equal(merged_logits, unmerged)  # the rounding the warning speaks of


# ---- memory arithmetic -----------------------------------------------------------------------------------------


def _allocated_bytes(model) -> int:
    """Bytes bitsandbytes really holds: parameters plus 4-bit quantization state / int8 row scales."""
    total = 0
    for param in model.parameters():
        total += param.nbytes
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += sum(t.nbytes for t in (state.absmax, state.code, state.offset) if t is not None)
            if state.state2 is not None:
                total += state.state2.absmax.nbytes + state.state2.code.nbytes
        if getattr(param, "SCB", None) is not None:
            total += param.SCB.nbytes
    return total


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("keep", [(), ("vision", "projector")], ids=["all", "keep-vision"])
@pytest.mark.parametrize("bits", BITS)
def test_footprint_arithmetic_matches_the_loaded_model(saved_vlm, bits, keep, double_quant):
    config = vlm_bnb_config(
        saved_vlm, bits=bits, keep_high_precision=keep, compute_dtype=torch.float32, double_quant=double_quant
    )
    model = AutoModelForImageTextToText.from_pretrained(saved_vlm, quantization_config=config, device_map="cpu")
    footprint = quantized_footprint(saved_vlm, config, dtype=torch.float32)  # from the config, on meta
    assert footprint["total"].bytes == _allocated_bytes(model)
    reference = build_tiny_vlm("llava")
    quantized = sum(m.weight.numel() for m in _linears(reference).values()) - reference.lm_head.weight.numel()
    if keep:
        assert footprint["vision"].quantized_params == footprint["projector"].quantized_params == 0
    else:
        assert footprint["total"].quantized_params == quantized


def test_footprint_of_a_full_size_llava_on_meta():
    """LLaVA-1.5-7B shape (transformers' default LlavaConfig), NF4 with the vision side kept in bf16."""
    config = AutoConfig.for_model("llava")
    footprint = quantized_footprint(config, vlm_bnb_config(config))
    total, vision, language = footprint["total"], footprint["vision"], footprint["language"]
    assert 6.5e9 < total.params < 7.5e9
    assert vision.bytes == vision.unquantized_bytes == 2 * vision.params  # kept in bf16
    assert language.quantized_params > 0.95 * language.params  # all linears; embeddings and norms stay bf16
    assert total.bytes < 0.35 * total.unquantized_bytes
