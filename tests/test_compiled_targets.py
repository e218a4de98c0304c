"""What PEFT actually wraps for the compiled regex and rank/alpha patterns, on real tiny models.

test_selection.py checks the target *list*; PEFT only ever sees the regex and the patterns. Here each adapter is
injected by PEFT and the wrapped modules, their ranks and their scalings are read back from the live model, so a
regex that over-selects (layer indices generalised where a layer range needs them exact) or a pattern that lands on
the wrong component fails. The fast set also covers linears of neither kind and the Q-Former's attention/MLP split.
"""

from __future__ import annotations

import re

import pytest
from helpers import fresh_model, shared_model
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from zoo_truth import expected_kind, expected_linears

from peft_vision_lora import VisionLoraConfig, compile_targets
from peft_vision_lora.resolve.targets import compact_regex

PREFIX = "base_model.model."


def wrapped(peft_model) -> dict[str, tuple[int, float]]:
    """{module name as in the base model: (rank, scaling)} for every LoRA layer PEFT injected."""
    return {
        name.removeprefix(PREFIX): (module.r["default"], module.scaling["default"])
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def inject(model_type: str, model: nn.Module | None = None, **flags):
    """(what PEFT wrapped, the plan compiled on an untouched copy of the same model)."""
    model = model if model is not None else fresh_model(model_type)
    plan = compile_targets(model, VisionLoraConfig(r=4, lora_alpha=8, **flags))
    return wrapped(get_peft_model(model, VisionLoraConfig(r=4, lora_alpha=8, **flags))), plan


def _layer_index(name: str, stack: str) -> int:
    return int(re.search(rf"{re.escape(stack)}\.(\d+)\.", name).group(1))


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_layer_range_wraps_only_the_listed_layers(model_type):
    # Both tiny towers have 2 layers: a generalised `\d+` would wrap layer 1 as well.
    got, plan = inject(model_type, component_layers={"language": [0], "vision": [-1]})
    assert set(got) == {t.name for t in plan.targets}
    language = [n for n, in_ in ((t.name, t.component) for t in plan.targets) if in_ == "language"]
    assert language and {_layer_index(n, "layers") for n in language} == {0}
    truth = expected_linears(shared_model(model_type), model_type, "language")
    assert {n for n in truth if _layer_index(n, "layers") == 0} == set(language)
    assert not [n for n in got if n in truth and _layer_index(n, "layers") == 1]


def test_per_component_rank_and_alpha_reach_each_wrapped_module():
    got, plan = inject(
        "llava",
        finetune_projector=True,
        component_r={"vision": 2, "projector": 8},
        component_alpha={"vision": 6},
        component_layers={"vision": [0]},  # llava's last CLIP layer feeds nothing
    )
    assert set(got) == {t.name for t in plan.targets}
    model = shared_model("llava")
    expected = {
        "vision": (2, 6 / 2),
        "projector": (8, 8 / 8),
        "language": (4, 8 / 4),
    }
    for component, (rank, scaling) in expected.items():
        names = expected_linears(model, "llava", component)
        if component == "vision":
            names = {n for n in names if _layer_index(n, "layers") == 0}
        assert names and {got[n] for n in names} == {(rank, scaling)}, component
    vision_layer_0 = {n for n in expected_linears(model, "llava", "vision") if _layer_index(n, "layers") == 0}
    language, projector = (expected_linears(model, "llava", c) for c in ("language", "projector"))
    assert set(got) == vision_layer_0 | language | projector


def test_compact_regex_generalises_only_where_it_selects_nothing_extra():
    universe = [f"tower.layers.{i}.{leaf}" for i in range(3) for leaf in ("q", "fc")] + ["tower.head"]
    every_q = {f"tower.layers.{i}.q" for i in range(3)}
    regex = compact_regex(every_q, universe)
    assert r"\d+" in regex  # compact where that is exact
    assert {n for n in universe if re.fullmatch(regex, n)} == every_q
    some_q = {"tower.layers.0.q", "tower.layers.2.q"}
    regex = compact_regex(some_q, universe)
    assert r"\d+" not in regex
    assert {n for n in universe if re.fullmatch(regex, n)} == some_q
    mixed = every_q | {"tower.layers.1.fc", "tower.head"}
    assert {n for n in universe if re.fullmatch(compact_regex(mixed, universe), n)} == mixed
    assert not re.fullmatch(compact_regex({"tower.head"}, universe), "tower.head.extra")  # anchored at both ends


def _with_neither_kind_linears(model_type: str = "llava") -> tuple[nn.Module, set[str]]:
    """A tiny model whose language layers also hold linears of neither kind (a hyper-connection, a bare `proj`)."""
    model = fresh_model(model_type)
    added = set()
    for index, layer in enumerate(model.model.language_model.layers):
        hidden = layer.self_attn.q_proj.in_features
        layer.hyper_connection = nn.Linear(hidden, hidden)
        layer.proj = nn.Linear(hidden, hidden)
        added |= {f"model.language_model.layers.{index}.hyper_connection", f"model.language_model.layers.{index}.proj"}
    return model, added


@pytest.mark.parametrize(
    ("attention", "mlp", "kept"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_linears_of_neither_kind_go_only_with_both_kinds(attention, mlp, kept):
    model, neither = _with_neither_kind_linears()
    flags = {"finetune_attention_modules": attention, "finetune_mlp_modules": mlp, "finetune_vision_layers": False}
    plan = compile_targets(model, VisionLoraConfig(r=4, **flags))
    assert {t.kind for t in plan.targets if t.name in neither} <= {"other"}
    got = set(wrapped(get_peft_model(model, VisionLoraConfig(r=4, **flags))))
    assert (neither <= got) if kept else not (neither & got)
    truth = expected_linears(shared_model("llava"), "llava", "language")
    wanted = {
        n for n in truth if (attention and expected_kind(n) == "attention") or (mlp and expected_kind(n) == "mlp")
    }
    assert got - neither == wanted


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_qformer_attention_mlp_split(kind):
    # The Q-Former is BERT-style: `attention.output.dense` is attention, `intermediate_query`/`output_query` MLP.
    model = shared_model("blip-2")
    flags = {"finetune_attention_modules": kind == "attention", "finetune_mlp_modules": kind == "mlp"}
    only_qformer = {"finetune_vision_layers": False, "finetune_language_layers": False, "finetune_qformer": True}
    plan = compile_targets(model, VisionLoraConfig(r=4, **flags, **only_qformer))
    qformer = expected_linears(model, "blip-2", "qformer")
    expected = {n for n in qformer if expected_kind(n) == kind}
    assert expected and {t.name for t in plan.targets} == expected
    assert any(n.endswith("attention.output.dense") for n in qformer)
    assert all(expected_kind(n) == "attention" for n in qformer if n.endswith("attention.output.dense"))


def test_only_the_wrapped_modules_train():
    model, neither = _with_neither_kind_linears()
    peft_model = get_peft_model(model, VisionLoraConfig(r=4, init_lora_weights=False, finetune_vision_layers=False))
    trainable = {
        n.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for n, p in peft_model.named_parameters() if p.requires_grad
    }
    assert trainable == set(wrapped(peft_model))
    assert neither <= trainable
    assert not [n for n in trainable if "vision_tower" in n]
