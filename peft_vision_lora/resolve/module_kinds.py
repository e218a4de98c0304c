"""What kind of linear a module is: a LoRA candidate at all, an attention or MLP linear, a router, quantized.

Kinds are decided by the enclosing blocks (attribute names, then class names), not only by leaf names: ``qkv``,
``in_proj``, ``fc1``, ``wi`` all occur on both sides across transformers' models.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import PreTrainedModel

from .names import ATTENTION, MLP, OTHER

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
try:  # GPT-2 style linears; PEFT's "all-linear" counts them too.
    from transformers.pytorch_utils import Conv1D

    LINEAR_TYPES = (nn.Linear, Conv1D)
except ImportError:  # pragma: no cover
    pass


# bitsandbytes linears PEFT has LoRA layers for: its ``dispatch_bnb_4bit``/``dispatch_bnb_8bit`` test
# ``isinstance`` against exactly these (so LinearNF4/LinearFP4, subclasses of Linear4bit, are covered too).
BNB_LORA_LINEARS: tuple[str, ...] = ("Linear4bit", "Linear8bitLt")


def _bnb_classes(module: nn.Module) -> set[str]:
    """Names of the bitsandbytes classes in ``module``'s MRO, read by name so bitsandbytes (slow, optional) is
    never imported here."""
    return {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("bitsandbytes")}


def is_bnb_class(module: nn.Module, name: str) -> bool:
    """``isinstance(module, bitsandbytes.<...>.<name>)`` without importing bitsandbytes."""
    return name in _bnb_classes(module)


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes linear PEFT can put a LoRA layer on (``Linear4bit``/``Linear8bitLt`` or a subclass)."""
    return not _bnb_classes(module).isdisjoint(BNB_LORA_LINEARS)


def is_candidate_linear(module: nn.Module) -> bool:
    """Linear layers LoRA can wrap: not subclasses that change ``forward`` (Llama4's router returns a tuple).

    Quantized linears are candidates only when PEFT has a LoRA layer for them (:func:`is_quantized_linear`); any
    other bitsandbytes linear (``OutlierAwareLinear``) is not, since PEFT would fall back to its plain ``nn.Linear``
    layer, whose merge writes into a weight the module re-quantizes.
    """
    if not isinstance(module, LINEAR_TYPES):
        return False
    cls = type(module)
    if cls in LINEAR_TYPES:
        return True
    if _bnb_classes(module):
        return is_quantized_linear(module)
    return all(cls.forward is base.forward for base in LINEAR_TYPES if isinstance(module, base))


def is_inert_linear(modules: dict[str, nn.Module], name: str) -> bool:
    """``nn.MultiheadAttention`` reads its ``out_proj`` as a bare weight: a LoRA wrapper there would never run."""
    return isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)  # "" (the root) for a top name


_ATTENTION_NAME = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_NAME = re.compile(r"(mlp|feed_?forward|ffn|^ff$|intermediate|experts?$|^output$|moe)", re.IGNORECASE)
_MLP_CLASS = re.compile(r"(MLP|Mlp|FeedForward|Intermediate|Output|MoE|Moe)")
_ATTENTION_CLASS = re.compile(r"(Attention|Mixer)")
# Residual-stream mixers sit beside attention/MLP: neither kind. Hyper-connections; Inkling 2 Loop's message gates
# (``q_message_gate``, ``mlp_message_gate``) blend the previous loop pass into a block's input.
_NEITHER_NAME = re.compile(r"hyper_connection|message_gate")
_ATTENTION_LEAF = re.compile(r"^(q|k|v|o|qkv|query|key|value|q_proj|k_proj|v_proj|o_proj|qkv_proj|out_proj|in_proj)$")
_MLP_LEAF = re.compile(r"^(fc\d?|up_proj|down_proj|gate_proj|gate_up_proj|wi|wi_0|wi_1|wo|w1|w2|w3|c_fc|dense_.*)$")


def module_kind(modules: dict[str, nn.Module], name: str) -> str:
    """'attention', 'mlp' or 'other', decided by the enclosing blocks (their attribute names, then class names).

    Ancestors are read from the leaf up to the numbered layer that holds them (or the transformers model that holds
    them). Attribute names decide first and attention wins over MLP, because BERT-style attention blocks contain an
    ``output`` submodule; class names decide next (NemotronH calls every block ``mixer``). Token mixers that are not
    softmax attention (Mamba, short convolutions, linear attention) count as attention: the split is token mixing
    vs channel mixing.
    """
    parts = name.split(".")
    labels = []  # (attribute, class) of the ancestors, nearest first
    for depth in range(len(parts) - 1, 0, -1):
        if parts[depth - 1].isdigit():
            break
        module = modules.get(".".join(parts[:depth]))
        if isinstance(module, PreTrainedModel):
            break  # a tower's or the model's own class name (Qwen3OmniMoe...) says nothing about this block
        labels.append((parts[depth - 1], type(module).__name__))  # "NoneType" if absent: matches no class
    if any(_NEITHER_NAME.search(a) for a, _ in labels):
        return OTHER
    if any(_ATTENTION_NAME.search(a) for a, _ in labels):
        return ATTENTION
    if any(_MLP_NAME.search(a) for a, _ in labels):
        return MLP
    if any(_ATTENTION_CLASS.search(c) for _, c in labels):
        return ATTENTION
    if any(_MLP_CLASS.search(c) for _, c in labels):
        return MLP
    leaf = parts[-1]
    if _ATTENTION_LEAF.match(leaf):
        return ATTENTION
    if _MLP_LEAF.match(leaf):
        return MLP
    return OTHER


def is_router(modules: dict[str, nn.Module], name: str) -> bool:
    """MoE routing linears are never LoRA targets: anything named ``router``, and a ``gate``/``*_gate`` linear (or
    a linear inside a ``gate`` module) that sits beside the block's ``experts``."""
    parts = name.split(".")
    for depth in range(len(parts), 0, -1):
        part = parts[depth - 1]
        if part.isdigit():
            return False  # up to the numbered layer (an expert's own linears sit below ``experts.<i>``)
        if "router" in part:
            return True
        experts = ".".join([*parts[: depth - 1], "experts"])  # beside this part; just "experts" at the root
        if (part == "gate" or part.endswith("_gate")) and experts in modules:
            return True
    return False


# PEFT's LoRA layers over other quantized bases, by the module PEFT defines each in (``peft/tuners/lora/<backend>.py``;
# its dispatchers choose them by the base layer's quantized type). The other modules there hold layers over
# unquantized bases: ``layer`` (Linear, Embedding, Conv, ...), ``tp_layer`` (Megatron), ``te`` (TransformerEngine).
PEFT_QUANTIZED_LORA_MODULES: dict[str, str] = {
    f"peft.tuners.lora.{backend}": f"peft-{backend}"
    for backend in ("aqlm", "awq", "eetq", "gptq", "hqq", "inc", "torchao")
}


def quantized_layer_path(module: nn.Module) -> str | None:
    """Forward path of a PEFT LoRA layer (a ``LoraLayer``) over a quantized base, for ``explain`` and the merge
    warning: "peft-bnb4", "peft-bnb8", "peft-gptq", "peft-hqq", ...; None for a layer over an unquantized base."""
    base = module.get_base_layer()
    if is_bnb_class(base, "Linear4bit"):
        return "peft-bnb4"
    if is_bnb_class(base, "Linear8bitLt"):
        return "peft-bnb8"
    return PEFT_QUANTIZED_LORA_MODULES.get(type(module).__module__)
