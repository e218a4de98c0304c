"""Loading is strict: every adapter weight lands on a module and every adapted module gets its weights.

Adapters saved under transformers' older VLM layout (``language_model.model.layers``, ``vision_tower.vision_model``,
top-level ``multi_modal_projector``) load onto today's layout (``model.language_model.layers``, ...) through
transformers' own rename rules, with a log line, and give the same logits.
"""

import copy
import json
import logging
import re

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from peft_vision_lora import AdapterLoadError, VisionLoraConfig
from peft_vision_lora.tuner.strict_load import _rename_summary

WEIGHTS = "adapter_model.safetensors"
# transformers < 4.52 layout of LLaVA-style models -> the layout transformers 5 builds (and our adapters name).
OLD_LAYOUT = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def _saved_adapter(tmp_path, model_type="llava"):
    config = VisionLoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True, component_r={"vision": 2}
    )
    model = get_peft_model(fresh_model(model_type), config).eval()
    with torch.no_grad():
        logits = model(**inputs_for(model_type)).logits
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, logits


def _rewrite_weights(folder, change):
    weights = load_file(folder / WEIGHTS)
    save_file(change(weights), folder / WEIGHTS, metadata={"format": "pt"})


def _load(folder, model_type="llava"):
    return PeftModel.from_pretrained(fresh_model(model_type), folder).eval()


def test_missing_adapter_weights_raise_naming_them(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    dropped = sorted(k for k in load_file(folder / WEIGHTS) if "layers.0.self_attn.q_proj.lora_B" in k)
    assert len(dropped) == 2  # one in the vision tower, one in the language model
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if k not in dropped})
    with pytest.raises(AdapterLoadError, match="2 adapted parameter\\(s\\) got no weights") as error:
        _load(folder)
    for key in dropped:  # named in model form, with the adapter name
        assert key.removesuffix(".weight") + ".default.weight" in str(error.value)


def test_unexpected_adapter_weights_raise_naming_them(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    stray = "base_model.model.model.language_model.layers.0.mlp.no_such_proj.lora_A.weight"
    _rewrite_weights(folder, lambda w: {**w, stray: torch.zeros(4, 32)})
    with pytest.raises(AdapterLoadError, match="1 adapter weight\\(s\\) match no module") as error:
        _load(folder)
    assert stray in str(error.value)
    assert isinstance(error.value, ValueError)


def test_adapter_of_another_model_type_fails_instead_of_loading_partly(tmp_path):
    # The language models share module names, the vision towers do not: PEFT alone would load the overlap.
    folder, _ = _saved_adapter(tmp_path, "llava")
    with pytest.raises(AdapterLoadError, match="match no module") as error:
        _load(folder, "qwen2_vl")
    assert "vision_tower" in str(error.value)


def _to_old_layout(folder):
    def rename(key):
        for new, old in OLD_LAYOUT.items():
            key = key.replace("base_model.model." + new, "base_model.model." + old)
        return key

    def rename_regex(text):
        for new, old in OLD_LAYOUT.items():
            text = text.replace(re.escape(new), re.escape(old))
        return text

    _rewrite_weights(folder, lambda w: {rename(k): v for k, v in w.items()})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = rename_regex(config["target_modules"])
    config["rank_pattern"] = {rename_regex(k): v for k, v in config["rank_pattern"].items()}
    config["component_targets"] = {c: rename_regex(p) for c, p in config["component_targets"].items()}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return config


def test_old_transformers_layout_is_remapped_logged_and_exact(tmp_path, caplog):
    folder, expected = _saved_adapter(tmp_path)
    config = _to_old_layout(folder)
    assert "language_model\\.model\\.layers" in config["target_modules"]
    assert not any(k.startswith("base_model.model.model.") for k in load_file(folder / WEIGHTS))

    with caplog.at_level(logging.WARNING, logger="peft_vision_lora"):
        model = _load(folder)
    saved = list(load_file(folder / WEIGHTS))
    count = {old: sum(k.startswith("base_model.model." + old) for k in saved) for old in OLD_LAYOUT.values()}
    assert sum(count.values()) == len(saved) and all(count.values())
    summary = (  # sorted by old prefix, one entry per layout change, with the number of keys it renamed
        f"language_model.model.* -> model.language_model.* ({count['language_model.model.']} keys); "
        f"multi_modal_projector.* -> model.multi_modal_projector.* ({count['multi_modal_projector.']} keys); "
        f"vision_tower.vision_model.* -> model.vision_tower.* ({count['vision_tower.vision_model.']} keys)"
    )
    expected_log = (
        f"Adapter 'default' was saved with an older transformers module layout; remapped {len(saved)} key(s): "
    )
    assert expected_log + summary in [record.getMessage() for record in caplog.records]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for("llava")).logits, expected, rtol=1e-5, atol=1e-6)
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "r") and "default" in m.r}
    assert {r for n, r in ranks.items() if "vision_tower" in n} == {2}
    assert {r for n, r in ranks.items() if "vision_tower" not in n} == {4}


def test_old_layout_with_a_lost_tensor_still_fails(tmp_path):
    folder, _ = _saved_adapter(tmp_path)
    _to_old_layout(folder)
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if "layers.0.mlp.up_proj.lora_A" not in k})
    with pytest.raises(AdapterLoadError, match="layers.0.mlp.up_proj.lora_A.default.weight"):
        _load(folder)


def _set_base_model_name(folder, name):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = name
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("dropped, listed", [(12, "]"), (13, ", ... (1 more)]")])
def test_the_refusal_lists_twelve_keys_then_counts_the_rest(tmp_path, dropped, listed):
    folder, _ = _saved_adapter(tmp_path)
    _set_base_model_name(folder, "org/tiny-llava")
    lora_b = sorted(k for k in load_file(folder / WEIGHTS) if ".lora_B." in k)
    lost = lora_b[:dropped]
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if k not in lost})
    with pytest.raises(AdapterLoadError) as error:
        _load(folder)
    named = [k.removesuffix(".weight") + ".default.weight" for k in lost]
    assert str(error.value) == (
        "Adapter 'default' does not fit this model; nothing was loaded. "
        f"{dropped} adapted parameter(s) got no weights: [{', '.join(named[:12])}{listed}. "
        "Load the adapter onto the base model it was trained on (adapter_config.json says "
        "base_model_name_or_path='org/tiny-llava') with a transformers version that uses the same module names, or "
        "re-save it from a model with this layout. The base model was left as it was: the LoRA layers injected for "
        "this load were removed again."
    )


def test_a_second_adapter_is_checked_against_its_own_weights_only(tmp_path):
    """Loading adapter "second" next to "default" succeeds, and a gap in a third one is reported under its own name:
    the other adapters' weights neither fill nor excuse it."""
    folder, _ = _saved_adapter(tmp_path)
    model = _load(folder)
    model.load_adapter(folder, adapter_name="second")
    assert set(model.peft_config) == {"default", "second"}
    lost = [k for k in load_file(folder / WEIGHTS) if "layers.1.mlp.down_proj.lora_A" in k]
    _rewrite_weights(folder, lambda w: {k: v for k, v in w.items() if k not in lost})
    with pytest.raises(AdapterLoadError, match=r"^Adapter 'third' does not fit") as error:
        model.load_adapter(folder, adapter_name="third")
    assert f"{len(lost)} adapted parameter(s) got no weights" in str(error.value)
    assert ".default." not in str(error.value) and ".second." not in str(error.value)


def test_peft_low_level_api_on_a_bare_model_loads_strictly_too(tmp_path):
    """``inject_adapter_in_model`` + ``set_peft_model_state_dict`` on the transformers model itself (no PeftModel,
    no ``base_model.model.`` prefix in the model's keys): the right weights load, a stray one is refused."""
    folder, expected = _saved_adapter(tmp_path)
    weights = load_file(folder / WEIGHTS)
    config = PeftConfig.from_pretrained(folder)
    base = inject_adapter_in_model(config, fresh_model("llava")).eval()
    result = set_peft_model_state_dict(base, weights)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs_for("llava")).logits, expected, rtol=1e-5, atol=1e-6)
    stray = "base_model.model.model.language_model.layers.0.mlp.no_such_proj.lora_A.weight"
    base = inject_adapter_in_model(config, fresh_model("llava"))
    with pytest.raises(AdapterLoadError, match="1 adapter weight\\(s\\) match no module") as error:
        set_peft_model_state_dict(base, {**weights, stray: torch.zeros(4, 32)})
    assert "no_such_proj" in str(error.value)


@pytest.mark.parametrize(
    "old, new, shown",
    [
        (
            "language_model.model.layers.0.q.weight",
            "model.language_model.layers.0.q.weight",
            "language_model.model.* -> model.language_model.*",
        ),
        ("model.text.layers.0.q.weight", "text.layers.0.q.weight", "model.text.* -> text.*"),  # a prefix dropped
        ("vision.blocks.0.q.weight", "vision.layers.0.q.weight", "vision.blocks.* -> vision.layers.*"),
    ],
)
def test_the_rename_summary_shows_what_changed_and_the_first_shared_segment(old, new, shown):
    prefix = "base_model.model."
    renames = {prefix + old: prefix + new, prefix + old.replace(".q.", ".k."): prefix + new.replace(".q.", ".k.")}
    assert _rename_summary(renames) == f"{shown} (2 keys)"


class _NoConfigVLM(nn.Module):
    """A hand-rolled VLM (no transformers config): no rename rules to look up."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(8, 8))
        self.language_model = nn.Sequential(nn.Linear(8, 8))

    def forward(self, x):
        return self.language_model(self.vision_tower(x))


def test_a_model_without_a_config_loads_strictly(tmp_path):
    torch.manual_seed(0)
    base = _NoConfigVLM()
    fresh_base = copy.deepcopy(base)
    model = get_peft_model(base, VisionLoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 8)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    _rewrite_weights(tmp_path, lambda w: {**w, "base_model.model.vision_tower.1.lora_A.weight": torch.zeros(2, 8)})
    with pytest.raises(AdapterLoadError, match="1 adapter weight\\(s\\) match no module"):
        PeftModel.from_pretrained(_NoConfigVLM(), tmp_path)
