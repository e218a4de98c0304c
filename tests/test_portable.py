"""Portable adapters (``save_pretrained(dir, portable=True)``, what ``push_to_hub`` uploads): vanilla PEFT loads
them in a process that never imports this package, to the same logits; with the package imported the same folder
comes back as the full ``VisionLoraConfig``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import fresh_model, inputs_for
from huggingface_hub import ModelCard
from peft import get_peft_model

from peft_vision_lora import VisionLoraConfig

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(
    r=4,
    lora_alpha=8,
    init_lora_weights=False,
    finetune_projector="full",
    component_r={"vision": 2, "language": 6},
    component_alpha={"language": 3},
)

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    root, with_package = sys.argv[1], sys.argv[2] == "1"
    if with_package:
        import peft_vision_lora  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(f"{root}/base").eval()
    model = PeftModel.from_pretrained(base, f"{root}/adapter").eval()
    with torch.no_grad():
        logits = model(**torch.load(f"{root}/inputs.pt")).logits
    expected = torch.load(f"{root}/expected.pt")
    config = model.peft_config["default"]
    print("REPORT" + json.dumps({
        "max_diff": float((logits - expected).abs().max()),
        "config": type(config).__name__,
        "peft_type": str(config.peft_type.value),
        "fields": {k: getattr(config, k, None) for k in ("component_r", "component_alpha", "finetune_projector")},
        "imported": sorted(m for m in sys.modules if m.startswith("peft_vision_lora")),
    }))
    """
)


def _load_in_child(root: Path, with_package: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), "1" if with_package else "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


def test_portable_adapter_loads_with_and_without_the_package(tmp_path):
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(**SETTINGS)).eval()
    with torch.no_grad():
        expected = model(**inputs_for("llava")).logits
    model.save_pretrained(tmp_path / "adapter", portable=True)
    fresh_model("llava").save_pretrained(tmp_path / "base")
    torch.save(inputs_for("llava"), tmp_path / "inputs.pt")
    torch.save(expected, tmp_path / "expected.pt")

    plain = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    full = json.loads((tmp_path / "adapter" / "vision_lora_config.json").read_text())
    assert plain["peft_type"] == "LORA" and full["peft_type"] == "VISION_LORA"
    assert "component_r" not in plain and full["component_r"] == SETTINGS["component_r"]
    card = ModelCard.load(tmp_path / "adapter" / "README.md").text
    assert "With PEFT alone" in card and "import peft_vision_lora" in card and "KeyError" not in card

    alone = _load_in_child(tmp_path, with_package=False)
    assert alone["imported"] == []
    assert (alone["config"], alone["peft_type"]) == ("LoraConfig", "LORA")
    assert alone["max_diff"] < 1e-5

    restored = _load_in_child(tmp_path, with_package=True)
    assert (restored["config"], restored["peft_type"]) == ("VisionLoraConfig", "VISION_LORA")
    assert restored["fields"] == {k: SETTINGS[k] for k in ("component_r", "component_alpha", "finetune_projector")}
    assert restored["max_diff"] < 1e-5


def test_default_save_card_says_first_that_peft_alone_cannot_load_it(tmp_path):
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "VISION_LORA"
    assert not (tmp_path / "adapter" / "vision_lora_config.json").exists()
    section = ModelCard.load(tmp_path / "adapter" / "README.md").text.split("<!-- peft-vision-lora card: start")[1]
    first_lines = "\n".join(section.splitlines()[:5])
    assert "KeyError: 'VISION_LORA'" in first_lines and "portable=True" in first_lines


def test_portable_save_of_several_adapters(tmp_path):
    model = get_peft_model(fresh_model("llava"), VisionLoraConfig(r=4, finetune_language_layers=False))
    model.add_adapter("language", VisionLoraConfig(r=8, finetune_vision_layers=False))
    model.save_pretrained(tmp_path / "both", portable=True)
    for folder, rank in ((tmp_path / "both", 4), (tmp_path / "both" / "language", 8)):
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        assert json.loads((folder / "vision_lora_config.json").read_text())["peft_type"] == "VISION_LORA"
