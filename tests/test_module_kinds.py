"""Attention vs MLP vs neither, on hand-built blocks named the way transformers' models name them.

The tiny zoo has few of these layouts on the fast path: BERT's ``attention.output.dense`` (attention, though
``output`` alone means MLP), Mamba-style ``mixer`` classes, hyper-connections and message gates.
"""

from __future__ import annotations

import pytest
from torch import nn

from peft_vision_lora.resolve.module_kinds import is_candidate_linear, is_router, module_kind


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
