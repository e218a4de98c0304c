"""VisionLoraConfig: defaults, presets, validation and JSON round-trips."""

import json

import pytest
from peft import LoraConfig, PeftConfig
from peft.utils.peft_types import PeftType

import peft_vision_lora  # noqa: F401  (registers VISION_LORA)
from peft_vision_lora import VisionLoraConfig, VisionLoraConfigError


def test_defaults_follow_unsloth():
    cfg = VisionLoraConfig()
    assert cfg.peft_type == PeftType.VISION_LORA
    assert isinstance(cfg, LoraConfig)
    assert cfg.target_modules == "all-linear"
    assert cfg.finetune_vision_layers and cfg.finetune_language_layers
    assert cfg.finetune_attention_modules and cfg.finetune_mlp_modules
    assert cfg.finetune_projector is False
    assert cfg.finetune_cross_attention is True  # follows language
    assert cfg.finetune_audio_layers is False
    assert not cfg.is_resolved


@pytest.mark.parametrize(
    ("task", "vision", "language"),
    [("ocr", True, True), ("captioning", True, True), ("vqa", False, True), ("domain_adaptation", True, False)],
)
def test_task_presets(task, vision, language):
    cfg = VisionLoraConfig(task=task)
    assert (cfg.finetune_vision_layers, cfg.finetune_language_layers) == (vision, language)
    assert cfg.finetune_cross_attention == language


def test_explicit_flags_override_preset():
    cfg = VisionLoraConfig(task="vqa", finetune_vision_layers=True)
    assert cfg.finetune_vision_layers is True and cfg.finetune_language_layers is True
    cfg = VisionLoraConfig(task="domain_adaptation", finetune_cross_attention=True)
    assert cfg.finetune_language_layers is False and cfg.finetune_cross_attention is True


def test_aliases_normalise():
    assert VisionLoraConfig(task="document").task == "ocr"


def test_cross_attention_follows_language_unless_set():
    assert VisionLoraConfig(finetune_language_layers=False).finetune_cross_attention is False
    assert VisionLoraConfig(finetune_cross_attention=False).finetune_cross_attention is False


def test_qformer_follows_projector():
    assert VisionLoraConfig().finetune_qformer is False
    assert VisionLoraConfig(finetune_projector=True).finetune_qformer is True
    assert VisionLoraConfig(finetune_projector="full", finetune_qformer=False).finetune_qformer is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "segmentation"}, "Unknown task preset 'segmentation'"),
        ({"r": 0}, "`r` must be a positive integer"),
        ({"r": -4}, "`r` must be a positive integer"),
        ({"component_r": {"vision": 0}}, "positive integers"),
        ({"component_r": {"visoin": 8}}, "Unknown component(s) ['visoin']"),
        ({"component_alpha": {"decoder": 8}}, "Unknown component(s) ['decoder']"),
        ({"component_alpha": {"vision": 0}}, "Alphas in `component_alpha` must be positive numbers"),
        ({"component_alpha": {"vision": -2.5}}, "Alphas in `component_alpha` must be positive numbers"),
        ({"component_alpha": {"vision": True}}, "Alphas in `component_alpha` must be positive numbers"),
        ({"finetune_projector": "half"}, "finetune_projector"),
        ({"kernel": "cuda"}, "Unknown kernel 'cuda'"),
        (
            {"finetune_vision_layers": False, "finetune_language_layers": False},
            "no linear layer matched: vision=False, language=False",
        ),
        ({"finetune_attention_modules": False, "finetune_mlp_modules": False}, "no linear layer matched"),
    ],
)
def test_bad_input_raises_actionable_error(kwargs, message):
    with pytest.raises(VisionLoraConfigError) as info:
        VisionLoraConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_projector_alone_is_a_valid_selection():
    cfg = VisionLoraConfig(finetune_vision_layers=False, finetune_language_layers=False, finetune_projector=True)
    assert cfg.selected_components() == {"projector", "qformer"}


def test_json_round_trip(tmp_path):
    cfg = VisionLoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=0.05,
        task="vqa",
        finetune_projector="full",
        component_r={"language": 16},
        component_alpha={"language": 8},
        target_modules=["q_proj", "v_proj"],
    )
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "VISION_LORA"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is VisionLoraConfig
    for name in ("r", "lora_alpha", "lora_dropout", "task", "finetune_projector", "component_r", "component_alpha"):
        assert getattr(loaded, name) == getattr(cfg, name), name
    assert set(loaded.target_modules) == {"q_proj", "v_proj"}
    assert loaded.finetune_vision_layers is False and loaded.finetune_language_layers is True
    assert loaded.to_dict() == VisionLoraConfig.from_pretrained(tmp_path).to_dict()
