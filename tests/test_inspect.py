"""``peft-vision-lora inspect``: meta-device builds (no weights, no download) and the numbers it prints.

Expected numbers come from the configs by hand (LoRA on a d_in x d_out linear has r * (d_in + d_out) parameters)
and from the hand-written truth of `zoo_truth.py`, not from the resolver.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from transformers import LlavaConfig
from zoo_truth import expected_kind, expected_linears

from peft_vision_lora.cli import main
from peft_vision_lora.reports.inspection import load_for_inspect, strategy_counts
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_config


def row(output: str, name: str, table: str = "components") -> list[str]:
    """The whitespace-split cells of the line starting with ``name`` in the component or the strategy table."""
    components, strategies = output.split("LoRA parameters per strategy")
    text = components if table == "components" else strategies
    line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    return line.split()


def llama_lora_params(r: int, hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int) -> int:
    head_dim = hidden // heads
    attention = r * (hidden + hidden) * 2 + r * (hidden + kv_heads * head_dim) * 2  # q, o and k, v
    mlp = r * (hidden + intermediate) * 3  # gate, up, down
    return layers * (attention + mlp)


def clip_lora_params(r: int, hidden: int, intermediate: int, layers: int) -> int:
    return layers * (r * (hidden + hidden) * 4 + r * (hidden + intermediate) * 2)


def test_full_size_llava_numbers_match_the_default_config(capsys):
    assert main(["inspect", "llava", "--full-size", "-r", "16"]) == 0
    out = capsys.readouterr().out
    config = LlavaConfig()
    text, vision = config.text_config, config.vision_config
    language = llama_lora_params(
        16,
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.num_hidden_layers,
    )
    # The projector reads layer vision_feature_layer=-2: the last CLIP layer never reaches the output, so no
    # strategy adapts it (issue 15's dead adapters).
    assert config.vision_feature_layer == -2
    live_vision_layers = vision.num_hidden_layers - 1
    vision_params = clip_lora_params(16, vision.hidden_size, vision.intermediate_size, live_vision_layers)
    assert language == 39_976_960 and vision_params == 7_077_888 * 23 // 24  # LLaVA-1.5-7B: Llama-2-7B + CLIP-L
    assert row(out, "language", "strategies")[1:3] == [str(7 * text.num_hidden_layers), f"{language:,}"]
    assert row(out, "vision", "strategies")[1:3] == [str(6 * live_vision_layers), f"{vision_params:,}"]
    assert row(out, "vision+language", "strategies")[2] == f"{language + vision_params:,}"
    share = language / (language + vision_params)
    assert f"{share:.1%}" in row(out, "language", "strategies")
    assert row(out, "language")[1:4] == [str(7 * text.num_hidden_layers), str(4 * 32), str(3 * 32)]
    assert "model.language_model.layers [32]" in out and "model.vision_tower.encoder.layers [24]" in out
    # The default config is a 7B model: building it for real would need 28 GB.
    assert re.search(r"7,0\d\d,\d{3},\d{3} parameters", out)


def test_built_on_the_meta_device():
    model, source = load_for_inspect("llava", full_size=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert "full-size" in source
    tiny, _ = load_for_inspect("qwen2_vl")
    assert {p.device.type for p in tiny.parameters()} == {"meta"}


def test_tiny_component_counts_match_the_truth(capsys):
    assert main(["inspect", "mllama", "-r", "4"]) == 0
    out = capsys.readouterr().out
    model = build_tiny_vlm("mllama")
    for component in ("vision", "language", "cross_attention", "projector"):
        names = expected_linears(model, "mllama", component)
        cells = row(out, component)
        assert int(cells[1]) == len(names), component
        if component != "projector":
            kinds = [expected_kind(n) for n in names]
            assert [int(c) for c in cells[2:4]] == [kinds.count("attention"), kinds.count("mlp")], component
    assert "model.vision_model.transformer.layers [2], model.vision_model.global_transformer.layers [1]" in out


def test_strategy_counts_say_why_a_strategy_is_empty():
    chameleon, _ = load_for_inspect("chameleon")
    counts = strategy_counts(chameleon, r=8)
    assert counts["vision"].reason == "no vision tower on this model"
    assert counts["vision+language"].params == 0 and counts["language"].params > 0
    omni, _ = load_for_inspect("qwen2_5_omni_thinker")
    counts = strategy_counts(omni, r=8)
    assert counts["audio"].modules > 0 and "audio" not in counts["vision+language"].per_component


def test_local_folder_reads_its_config_and_downloads_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_config("llava", text_config={"num_hidden_layers": 3}).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "-r", "2"]) == 0
    out = capsys.readouterr().out
    assert f"config.json of {tmp_path}" in out
    assert "model.language_model.layers [3]" in out
    assert int(row(out, "language")[1]) == 7 * 3


@pytest.mark.parametrize("name", ["not_a_model_type", "some-org/some-model"])
def test_unknown_model_is_a_clear_error(name, capsys):
    assert main(["inspect", name]) == 2
    captured = capsys.readouterr()
    assert "Nothing is downloaded" in captured.err and "llava" in captured.err and not captured.out


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "peft_vision_lora.cli", "inspect", "paligemma", "-r", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "LoRA parameters per strategy at r=8" in result.stdout
    assert row(result.stdout, "projector")[1] == "1"  # PaliGemma's projector is one linear


def _coverage_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_coverage.py"
    spec = importlib.util.spec_from_file_location("make_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parents[1] / "docs" / "coverage.md"


def test_coverage_doc_is_generated_and_current():
    """docs/coverage.md has a row per model type, and the script regenerates its rows verbatim.

    The doc describes the transformers it was generated with. Under another one (a fresh install that resolved a newer
    release) it is stale by definition: skipped, with the command that regenerates it; strict under the locked one.
    """
    import transformers

    from peft_vision_lora.zoo.catalog import ZOO_MODEL_TYPES

    script, doc = _coverage_script()
    text = doc.read_text()
    generated_with = re.search(r"with transformers (\S+?);", text).group(1)
    if generated_with != transformers.__version__:
        pytest.skip(
            f"docs/coverage.md describes transformers {generated_with}, installed is {transformers.__version__}: "
            "regenerate it with `python scripts/make_coverage.py`"
        )
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model type")]
    assert sorted(line.split(" | ")[0].removeprefix("| ") for line in rows) == sorted(ZOO_MODEL_TYPES)
    for model_type in ("llava", "qwen2_5_omni_thinker", "gemma3n", "apertus1p5"):
        assert script.coverage_row(model_type)[0] in rows
    assert "| gemma3n | not built here: TimmWrapperModel vision tower needs `timm`" in text
    structural = [row for row in rows if "structural only" in row]
    assert len(structural) == len(set(ZOO_MODEL_TYPES) - script.HAND_CHECKED)


def test_coverage_marks_types_without_truth_as_structural_only():
    """A type nobody has written truth for yet says so, with the verdict of the generic invariants."""
    script, _ = _coverage_script()
    row, shares = script.coverage_row("llava", hand_checked=False)
    assert "**structural only** (no hand-written truth yet): generic invariants hold" in row
    assert shares["language"] is not None
    assert "structural only" not in script.coverage_row("llava")[0]
    assert "(structural only: unchecked until it builds)" in script.coverage_row("gemma3n", hand_checked=False)[0]
