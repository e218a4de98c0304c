"""Which linears are candidates, of what kind, and which are routers, inert or quantized.

Kinds on hand-built blocks named the way transformers' models name them (the tiny zoo has few of these layouts on
the fast path: BERT's ``attention.output.dense``, Mamba-style ``mixer`` classes, hyper-connections, message gates),
then on real transformers modules: MoE blocks, ``nn.MultiheadAttention``, bitsandbytes linears and the PEFT LoRA
layers built over them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import shared_model
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.resolve.module_kinds import (
    is_bnb_class,
    is_candidate_linear,
    is_inert_linear,
    is_quantized_linear,
    is_router,
    module_kind,
    quantized_layer_path,
)
from peft_vision_lora.tuner.layer import dispatch_vision_lora


def _linear() -> nn.Linear:
    return nn.Linear(4, 4)


class BertSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = _linear(), _linear(), _linear()


class BertSelfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = _linear()


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self, self.output = BertSelfAttention(), BertSelfOutput()


class BertIntermediate(BertSelfOutput):
    pass


class BertOutput(BertSelfOutput):
    pass


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.intermediate, self.output = BertAttention(), BertIntermediate(), BertOutput()


class Block(nn.Module):
    """A layer whose children are named in ways only class names or leaf names can place."""

    def __init__(self):
        super().__init__()
        self.mixer = MambaMixer()
        self.hyper_connection = _linear()
        self.q_message_gate = _linear()
        self.proj = _linear()
        self.fc1 = _linear()
        self.q = _linear()
        self.block = ChannelFeedForward()


class MambaMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = _linear()


class ChannelFeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = _linear()


def _modules(layer: nn.Module) -> dict[str, nn.Module]:
    root = nn.Module()
    root.layer = nn.ModuleList([layer])
    return dict(root.named_modules())


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("layer.0.attention.self.query", "attention"),
        ("layer.0.attention.self.value", "attention"),
        ("layer.0.attention.output.dense", "attention"),  # attention wins over the `output` inside it
        ("layer.0.intermediate.dense", "mlp"),
        ("layer.0.output.dense", "mlp"),
    ],
)
def test_bert_style_names(name, kind):
    assert module_kind(_modules(BertLayer()), name) == kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("layer.0.mixer.in_proj", "attention"),  # a token mixer, by class name
        ("layer.0.block.w", "mlp"),  # by class name (FeedForward)
        ("layer.0.hyper_connection", "other"),
        ("layer.0.q_message_gate", "other"),  # `q` in the name does not make it attention
        ("layer.0.proj", "other"),  # an unknown leaf directly under the layer
        ("layer.0.fc1", "mlp"),  # OPT-style leaf under the layer
        ("layer.0.q", "attention"),
    ],
)
def test_class_leaf_and_neither_kinds(name, kind):
    assert module_kind(_modules(Block()), name) == kind


def test_routers_and_linear_subclasses_are_not_targets():
    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts, self.router = _linear(), nn.ModuleList([_linear()]), _linear()

    modules = _modules(Moe())
    assert is_router(modules, "layer.0.gate") and is_router(modules, "layer.0.router")
    assert not is_router(modules, "layer.0.experts.0")

    class TupleLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x), None

    class SameForward(nn.Linear):
        pass

    assert is_candidate_linear(_linear()) and is_candidate_linear(SameForward(2, 2))
    assert not is_candidate_linear(TupleLinear(2, 2)) and not is_candidate_linear(nn.Conv1d(2, 2, 1))


# ---- kinds on real transformers modules ------------------------------------------------------------------------


def _submodules(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """``named_modules`` of the block at ``prefix``, as if that block were the model handed to PEFT."""
    return dict(model.get_submodule(prefix).named_modules())


@pytest.mark.parametrize(
    ("model_type", "block", "name", "kind"),
    [
        ("qwen2_vl", "model.visual.blocks.0", "attn.proj", "attention"),  # `proj` alone says nothing
        ("qwen2_vl", "model.visual.merger", "mlp.0", "mlp"),
        ("blip-2", "qformer.encoder.layer.0", "attention.output.dense", "attention"),
        ("blip-2", "qformer.encoder.layer.0", "crossattention.output.dense", "attention"),
        ("blip-2", "qformer.encoder.layer.0", "intermediate_query.dense", "mlp"),
        ("blip-2", "qformer.encoder.layer.0", "output_query.dense", "mlp"),
    ],
)
def test_a_bare_block_is_read_from_its_first_attribute(model_type, block, name, kind):
    """Handed a single block, the attribute right under the root decides, as it does inside the whole model."""
    model = shared_model(model_type)
    assert module_kind(_submodules(model, block), name) == kind
    assert module_kind(dict(model.named_modules()), f"{block}.{name}") == kind


def test_the_nearest_attribute_decides_not_its_parent():
    """Qwen2-VL's merger: ``merger.mlp.0`` is an MLP by its ``mlp`` attribute (an ``nn.Sequential``); the merger
    above it (``PatchMerger``) and its index leaf name no kind."""
    modules = dict(shared_model("qwen2_vl").named_modules())
    assert module_kind(modules, "model.visual.merger.mlp.0") == "mlp"
    assert module_kind(modules, "model.visual.merger.mlp.2") == "mlp"


def test_a_tower_class_name_does_not_decide():
    """Qwen3-Omni-MoE's audio encoder holds ``proj1``/``proj2``/``conv_out`` directly: the tower is a
    ``PreTrainedModel`` whose class name (``Qwen3OmniMoeAudioEncoder``) would otherwise read as MoE, i.e. MLP."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    config = Qwen3OmniMoeAudioEncoderConfig(
        d_model=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=8, downsample_hidden_size=4,
        output_dim=8, num_mel_bins=16,
    )  # fmt: skip
    thinker = nn.Module()  # holds it as Qwen3OmniMoeThinkerForConditionalGeneration does
    thinker.audio_tower = Qwen3OmniMoeAudioEncoder(config)
    modules = dict(thinker.named_modules())
    kinds = {n: module_kind(modules, n) for n, m in modules.items() if isinstance(m, nn.Linear)}
    assert kinds == {
        "audio_tower.layers.0.self_attn.q_proj": "attention",
        "audio_tower.layers.0.self_attn.k_proj": "attention",
        "audio_tower.layers.0.self_attn.v_proj": "attention",
        "audio_tower.layers.0.self_attn.out_proj": "attention",
        "audio_tower.layers.0.fc1": "mlp",
        "audio_tower.layers.0.fc2": "mlp",
        "audio_tower.conv_out": "other",
        "audio_tower.proj1": "other",
        "audio_tower.proj2": "other",
    }


# ---- MoE routers -----------------------------------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_routers_in_real_moe_models():
    """HunYuan-MoE routes with ``mlp.gate.wg`` (a linear inside a ``gate`` module); Qwen2-MoE's
    ``shared_expert_gate`` (a ``*_gate`` beside ``experts``) gates the shared expert. The shared experts' own
    ``gate_proj`` and everything else are ordinary linears. In transformers 5 the main routers and the experts hold
    bare parameters, so no other linear is a router."""
    hunyuan = HunYuanMoEV1ForCausalLM(
        HunYuanMoEV1Config(
            vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_experts=2, moe_topk=1,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        )
    )  # fmt: skip
    qwen = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4,
            shared_expert_intermediate_size=4, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )
    )  # fmt: skip
    routers = {}
    for model in (hunyuan, qwen):
        modules = dict(model.named_modules())
        routers.update({n: is_router(modules, n) for n in _linear_names(model)})
    assert {n for n, r in routers.items() if r} == {
        "model.layers.0.mlp.gate.wg",
        "model.layers.0.mlp.shared_expert_gate",
    }
    assert (
        "model.layers.0.mlp.shared_expert.gate_proj" in routers
        and "model.layers.0.mlp.shared_mlp.gate_proj" in routers
    )

    # the MoE block alone (PEFT on a bare block): its experts sit at the root
    block = _submodules(hunyuan, "model.layers.0.mlp")
    assert {n: is_router(block, n) for n in _linear_names(block[""])} == {
        "gate.wg": True,
        "shared_mlp.gate_proj": False,
        "shared_mlp.up_proj": False,
        "shared_mlp.down_proj": False,
    }


# ---- nn.MultiheadAttention's out_proj --------------------------------------------------------------------------


def test_multihead_attention_out_proj_is_inert():
    """SigLIP's pooling head is an ``nn.MultiheadAttention``: its ``out_proj`` (a candidate linear subclass) is read
    as a bare weight, while the encoder's own ``self_attn.out_proj`` is an ordinary linear."""
    model = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=8,
            patch_size=4, vision_use_head=True,
        )
    )  # fmt: skip
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if is_candidate_linear(m)]
    assert {n for n in candidates if is_inert_linear(modules, n)} == {"head.attention.out_proj"}
    assert "encoder.layers.0.self_attn.out_proj" in candidates
    # a bare nn.MultiheadAttention as the model: its out_proj sits at the top
    attention = dict(nn.MultiheadAttention(8, 2).named_modules())
    assert is_inert_linear(attention, "out_proj")


def test_lora_on_multihead_attention_out_proj_never_runs():
    """Why out_proj is inert: a LoRA layer PEFT puts there (random B, so not a no-op) leaves the output unchanged."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    torch.manual_seed(0)
    model, x = Holder(), torch.randn(1, 3, 8)
    expected = model(x)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["out_proj"], init_lora_weights=False))
    assert adapted.base_model.model.attn.out_proj.lora_B["default"].weight.abs().sum() > 0
    assert torch.equal(adapted(x), expected)


# ---- bitsandbytes linears and the PEFT layers over quantized bases ---------------------------------------------


def _peft_bnb_layer(base: nn.Module) -> nn.Module | None:
    """The LoRA layer PEFT's own bnb dispatchers build for ``base`` (None when they build none)."""
    from peft.tuners.lora.bnb import dispatch_bnb_4bit, dispatch_bnb_8bit

    config = LoraConfig(r=2)
    return dispatch_bnb_4bit(base, "default", config, loaded_in_4bit=True, r=2) or dispatch_bnb_8bit(
        base, "default", config, loaded_in_8bit=True, r=2
    )


@pytest.mark.parametrize(
    ("cls_name", "path"),
    [
        ("Linear4bit", "peft-bnb4"),
        ("LinearNF4", "peft-bnb4"),
        ("LinearFP4", "peft-bnb4"),
        ("Linear8bitLt", "peft-bnb8"),
    ],
)
def test_bitsandbytes_linears_and_their_peft_layers(cls_name, path):
    bnb = pytest.importorskip("bitsandbytes")
    base = getattr(bnb.nn, cls_name)(64, 64)
    assert is_bnb_class(base, cls_name) and not is_bnb_class(base, "Embedding")
    assert is_quantized_linear(base) and is_candidate_linear(base)
    layer = _peft_bnb_layer(base)
    assert layer is not None and layer.get_base_layer() is base
    assert quantized_layer_path(layer) == path


def test_a_user_subclass_of_a_bitsandbytes_linear_is_recognised():
    """Read from the MRO, as PEFT's ``isinstance`` dispatch does: the subclass itself lives outside bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")

    class MyNF4(bnb.nn.LinearNF4):
        pass

    base = MyNF4(64, 64)
    assert is_bnb_class(base, "Linear4bit") and not is_bnb_class(base, "MyNF4")
    assert is_candidate_linear(base) and quantized_layer_path(_peft_bnb_layer(base)) == "peft-bnb4"


def test_bitsandbytes_linears_peft_cannot_wrap_are_not_candidates():
    """``OutlierAwareLinear`` is a bitsandbytes ``nn.Linear`` PEFT has no quantized LoRA layer for."""
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.OutlierAwareLinear(64, 64)
    assert is_bnb_class(base, "OutlierAwareLinear")
    assert not is_quantized_linear(base) and not is_candidate_linear(base)
    assert _peft_bnb_layer(base) is None
    plain = nn.Linear(4, 4)
    assert not is_bnb_class(plain, "Linear") and not is_quantized_linear(plain)


def test_peft_layers_over_other_quantized_bases_are_named_by_their_backend():
    """PEFT's GPTQ and AWQ LoRA layers (``peft.tuners.lora.gptq``/``.awq``) give "peft-gptq"/"peft-awq". Their
    backends (gptqmodel, autoawq) are not installed here, but these layer classes are PEFT's own and the path is
    read from the layer's class, so a plain linear stands in for the quantized base PEFT would wrap."""
    from peft.tuners.lora.awq import AwqLoraLinear
    from peft.tuners.lora.gptq import GPTQLoraLinear

    config = LoraConfig(r=2)
    assert quantized_layer_path(GPTQLoraLinear(nn.Linear(8, 8), "default", config=config, r=2)) == "peft-gptq"
    assert quantized_layer_path(AwqLoraLinear(nn.Linear(8, 8), "default", config=config, r=2)) == "peft-awq"


def test_layers_over_unquantized_bases_have_no_quantized_path():
    """PEFT's plain layers, ours, and PEFT's TransformerEngine layer (not a quantized base: merging it would
    re-quantize nothing)."""
    from peft.tuners.lora.te import TeLinear

    torch.manual_seed(0)
    adapted = get_peft_model(
        nn.Sequential(nn.Linear(8, 8), nn.Embedding(4, 8)), LoraConfig(r=2, target_modules=["0", "1"])
    )
    peft_layers = [m for m in adapted.modules() if hasattr(m, "lora_A")]
    assert len(peft_layers) == 2
    ours = dispatch_vision_lora(nn.Linear(8, 8), "default", config=VisionLoraConfig(r=2), r=2, lora_alpha=2)
    te = TeLinear(nn.Linear(8, 8), "default", config=LoraConfig(r=2), r=2)
    assert [quantized_layer_path(m) for m in (*peft_layers, ours, te)] == [None] * 4
