"""Plain-LoRA export (vanilla PEFT loads it without this package) and merged models that plain transformers reloads."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import fresh_model, inputs_for
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from peft_vision_lora import VisionLoraConfig, export_lora
from peft_vision_lora.cli import main as cli_main

WEIGHTS = "adapter_model.safetensors"
OUR_FIELDS = ("task", "finetune_vision_layers", "component_r", "requested_target_modules", "component_targets")


def _adapted(model_type: str, **overrides):
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True, component_r={"vision": 2})
    return get_peft_model(fresh_model(model_type), VisionLoraConfig(**{**settings, **overrides})).eval()


def _logits(model, model_type: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(model_type)).logits


def _modules(keys) -> set[str]:
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys if ".lora_" in k}


def _language_only_logits(model, model_type: str) -> torch.Tensor:
    """The adapter with every non-language LoRA switched off (B zeroed), computed on the live model."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "language_model" not in name:
                module.lora_B["default"].weight.zero_()
    return _logits(model, model_type)


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    root, cases = sys.argv[1], json.loads(sys.argv[2])
    report = {}
    for name, model_type in cases.items():
        base = AutoModelForImageTextToText.from_pretrained(f"{root}/base-{model_type}").eval()
        model = PeftModel.from_pretrained(base, f"{root}/{name}").eval()
        with torch.no_grad():
            logits = model(**torch.load(f"{root}/inputs-{model_type}.pt")).logits
        expected = torch.load(f"{root}/{name}.expected.pt")
        config = model.peft_config["default"]
        report[name] = {
            "close": bool(torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)),
            "max_diff": float((logits - expected).abs().max()),
            "config": type(config).__name__,
            "peft_type": str(config.peft_type.value),
        }
    report["imported"] = sorted(m for m in sys.modules if m.startswith("peft_vision_lora"))
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.slow
def test_exports_load_in_a_process_without_the_package(tmp_path):
    llava = _adapted("llava", use_rslora=True)
    qwen = _adapted("qwen2_vl", finetune_projector="full", component_r={"language": 6})
    cases = {
        "llava": (llava, "llava", {}, _logits(llava, "llava")),
        "qwen2_vl-full-projector": (qwen, "qwen2_vl", {}, _logits(qwen, "qwen2_vl")),
        "llava-language-folded": (
            llava,
            "llava",
            {"language_only": True, "fold_scaling": True},
            _language_only_logits(llava, "llava"),
        ),
    }
    for model_type in ("llava", "qwen2_vl"):
        fresh_model(model_type).save_pretrained(tmp_path / f"base-{model_type}")
        torch.save(inputs_for(model_type), tmp_path / f"inputs-{model_type}.pt")
    for name, (model, _, options, expected) in cases.items():
        model.save_pretrained(tmp_path / f"{name}-source")
        export_lora(tmp_path / f"{name}-source", tmp_path / name, **options)
        torch.save(expected, tmp_path / f"{name}.expected.pt")

    arg = json.dumps({name: model_type for name, (_, model_type, _, _) in cases.items()})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), arg], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report.pop("imported") == []
    for name, row in report.items():
        assert row["config"] == "LoraConfig" and row["peft_type"] == "LORA", (name, row)
        assert row["close"], (name, row["max_diff"])


def test_export_is_plain_lora_with_the_same_tensors(tmp_path):
    model = _adapted("qwen2_vl", finetune_projector="full")
    model.save_pretrained(tmp_path / "vision-lora")
    out = export_lora(tmp_path / "vision-lora", tmp_path / "plain")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not set(OUR_FIELDS) & set(config)
    source, exported = load_file(tmp_path / "vision-lora" / WEIGHTS), load_file(out / WEIGHTS)
    assert source.keys() == exported.keys()
    assert all(torch.equal(source[k], exported[k]) for k in source)
    assert sorted(config["target_modules"]) == sorted(_modules(exported)) == config["target_modules"]
    assert config["modules_to_save"] == ["model.visual.merger"]
    for module in config["target_modules"]:  # rank_pattern reproduces every module's rank
        rank = config["rank_pattern"].get(get_pattern_key(list(config["rank_pattern"]), module), config["r"])
        assert (
            rank == exported[f"base_model.model.{module}.lora_A.weight"].shape[0] == (2 if "visual" in module else 4)
        )
    card = ModelCard.load(out / "README.md")
    assert "vision-lora-strategy:vision-language-full-projector" in card.data.tags
    assert "plain PEFT LoRA" in card.text

    # The live model exports the same thing.
    live = export_lora(model, tmp_path / "from-model")
    assert json.loads((live / "adapter_config.json").read_text())["target_modules"] == config["target_modules"]
    assert all(torch.equal(t, load_file(live / WEIGHTS)[k]) for k, t in exported.items())


def test_language_only_export_drops_vision_projector_and_full_modules(tmp_path):
    model = _adapted("qwen2_vl", finetune_projector="full")
    out = export_lora(model, tmp_path / "language", language_only=True)
    config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(out / WEIGHTS)
    assert weights and all(".language_model." in k and ".lora_" in k for k in weights)
    assert config["modules_to_save"] is None
    assert config["rank_pattern"] == {}  # the vision-rank pattern matched nothing that was kept
    assert ModelCard.load(out / "README.md").data.tags.count("vision-lora-strategy:language") == 1


def _naive_merge_logits(folder, model_type: str) -> torch.Tensor:
    """What a loader that reads only `r` and `lora_alpha` computes (vLLM's PEFTHelper ignores the patterns)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / WEIGHTS)
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    base = fresh_model(model_type)
    with torch.no_grad():
        for module in _modules(weights):
            a = weights[f"base_model.model.{module}.lora_A.weight"]
            b = weights[f"base_model.model.{module}.lora_B.weight"]
            base.get_submodule(module).weight += scale * b @ a
    return _logits(base, model_type)


def test_fold_scaling_makes_global_alpha_over_r_exact(tmp_path):
    model = _adapted("llava", component_alpha={"projector": 2})
    expected = _logits(model, "llava")
    folded = export_lora(model, tmp_path / "folded", fold_scaling=True)
    plain = export_lora(model, tmp_path / "plain")
    torch.testing.assert_close(_naive_merge_logits(folded, "llava"), expected, rtol=1e-4, atol=1e-4)
    assert (_naive_merge_logits(plain, "llava") - expected).abs().max() > 1e-2  # why the option exists
    reloaded = PeftModel.from_pretrained(fresh_model("llava"), folded).eval()  # PEFT agrees
    torch.testing.assert_close(_logits(reloaded, "llava"), expected, rtol=1e-4, atol=1e-5)


def test_cli_export(tmp_path, capsys):
    _adapted("llava").save_pretrained(tmp_path / "adapter")
    assert cli_main(["export", str(tmp_path / "adapter"), str(tmp_path / "out"), "--language-only"]) == 0
    assert "peft_type LORA" in capsys.readouterr().out
    modules = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert modules and all(m.startswith("model.language_model.") for m in modules)

    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 1
    assert f"folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), str(tmp_path / "out2")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


def test_language_only_needs_the_component_record(tmp_path):
    _adapted("llava").save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["component_targets"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="component_targets"):
        export_lora(tmp_path / "adapter", tmp_path / "out", language_only=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "mllama"])
def test_merged_model_reloads_with_plain_transformers(tmp_path, model_type):
    model = _adapted(model_type)
    adapted = _logits(model, model_type)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(merged)
    assert not any(isinstance(m, LoraLayer) for m in reloaded.modules())
    torch.testing.assert_close(_logits(reloaded, model_type), adapted, rtol=1e-4, atol=1e-4)
    assert (_logits(fresh_model(model_type), model_type) - adapted).abs().max() > 1e-3  # the merge changed weights
