"""Adapters survive save/load in a fresh interpreter, keep per-component ranks, and merge to the same logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import FAST_MODEL_TYPES, fresh_model, inputs_for, model_type_params
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.zoo.tiny import SUPPORTED_TINY_MODEL_TYPES

SLOW = pytest.mark.slow
RANKS = {"vision": 2, "language": 6, "projector": 3, "cross_attention": 5, "qformer": 4}


# Gemma 3's projector is a bare weight matrix: it can only be trained fully.
PROJECTOR_FULL = {"gemma3"}


def _config(model_type: str) -> VisionLoraConfig:
    # init_lora_weights=False: B is random too, so the adapter changes the logits and a lost adapter is visible.
    projector = "full" if model_type in PROJECTOR_FULL else True
    return VisionLoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=projector, component_r=RANKS
    )


def _ranks(model) -> dict[str, int]:
    return {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _save(model_type: str, root) -> tuple[torch.Tensor, dict[str, int]]:
    model = get_peft_model(fresh_model(model_type), _config(model_type)).eval()
    with torch.no_grad():
        logits = model(**inputs_for(model_type)).logits
    model.save_pretrained(root / model_type)
    torch.save(logits, root / f"{model_type}.pt")
    return logits, _ranks(model)


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    {import_line}
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs
    root, types = sys.argv[1], sys.argv[2].split(",")
    report = {{}}
    for model_type in types:
        model = PeftModel.from_pretrained(build_tiny_vlm(model_type, seed=0), f"{{root}}/{{model_type}}").eval()
        with torch.no_grad():
            logits = model(**tiny_inputs(model_type, batch_size=2, seed=0)).logits
        expected = torch.load(f"{{root}}/{{model_type}}.pt")
        ranks = {{n: m.r["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}}
        # Bit-equality is too strict across two models: CPU matmuls round differently with memory alignment.
        close = torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
        report[model_type] = {{"equal": bool(close), "ranks": ranks}}
    print("REPORT" + json.dumps(report))
    """
)


def _run_child(root, model_types):
    code = CHILD.format(import_line="import peft_vision_lora")
    return subprocess.run(
        [sys.executable, "-c", code, str(root), ",".join(model_types)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "model_types",
    [
        pytest.param(FAST_MODEL_TYPES, id="fast"),
        pytest.param(
            tuple(t for t in SUPPORTED_TINY_MODEL_TYPES if t not in FAST_MODEL_TYPES),
            id="rest",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_fresh_process_reload_gives_identical_logits_and_ranks(tmp_path, model_types):
    expected_ranks = {t: _save(t, tmp_path)[1] for t in model_types}
    result = _run_child(tmp_path, model_types)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    for model_type in model_types:
        assert report[model_type]["equal"], f"{model_type}: reloaded logits differ"
        assert report[model_type]["ranks"] == expected_ranks[model_type], model_type


def test_fresh_process_without_import_fails_loudly(tmp_path):
    # Documented limitation: PEFT has no plugin hook, so VISION_LORA exists only after `import peft_vision_lora`.
    _save("llava", tmp_path)
    code = (
        "import sys\nfrom peft import PeftConfig\n"
        "assert 'peft_vision_lora' not in sys.modules\n"
        f"PeftConfig.from_pretrained({str(tmp_path / 'llava')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "KeyError: 'VISION_LORA'" in result.stderr


def test_saved_adapter_is_plain_lora_underneath(tmp_path):
    _save("qwen2_vl", tmp_path)
    folder = tmp_path / "qwen2_vl"
    config = PeftConfig.from_pretrained(folder)
    assert type(config) is VisionLoraConfig and config.is_resolved
    assert config.requested_target_modules == "all-linear"
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert any(k.startswith("base_model.model.model.visual.blocks.0.attn.qkv.lora_A") for k in keys)
    # Non-overlapping rank patterns: every targeted module matches exactly one key.
    import re

    for module in config_modules(folder):
        hits = [p for p in config.rank_pattern if re.match(rf"(.*\.)?({p})$", module)]
        assert len(hits) <= 1, (module, hits)


def config_modules(folder) -> set[str]:
    keys = load_file(folder / "adapter_model.safetensors").keys()
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


def test_ranks_per_component(tmp_path):
    model = get_peft_model(fresh_model("mllama"), _config("mllama"))
    components = {
        "vision_model": "vision",
        "cross_attn": "cross_attention",
        "language_model": "language",
        "multi_modal_projector": "projector",
    }
    for name, rank in _ranks(model).items():
        component = next(c for key, c in components.items() if key in name)
        assert rank == RANKS[component], name


@pytest.mark.parametrize("model_type", model_type_params())
def test_merge_and_unload_matches_unmerged(model_type):
    model = get_peft_model(fresh_model(model_type), _config(model_type)).eval()
    batch = inputs_for(model_type)
    with torch.no_grad():
        adapted = model(**batch).logits
        merged_model = model.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in merged_model.modules())
        merged = merged_model(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_reload_onto_fresh_model_in_process(tmp_path):
    logits, _ = _save("llava", tmp_path)
    model = PeftModel.from_pretrained(fresh_model("llava"), tmp_path / "llava").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for("llava")).logits, logits, rtol=1e-5, atol=1e-6)
