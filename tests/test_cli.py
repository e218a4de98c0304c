"""The command line as a user runs it: a subprocess, its exit status, stdout and stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fresh_model
from peft import get_peft_model
from safetensors.torch import load_file

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora_cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "peft_vision_lora_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_help_imports_neither_peft_nor_torch():
    # What keeps --help fast is importing nothing heavy; its time is measured by benchmarks/startup.py, not asserted.
    code = (
        "import sys; from peft_vision_lora_cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'peft', 'transformers', 'peft_vision_lora') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def _all_actions(parser):
    for action in parser._actions:
        yield parser.prog, action
        for sub in getattr(action, "choices", None) or {}:
            if hasattr(action.choices[sub], "_actions"):
                yield from _all_actions(action.choices[sub])


def test_every_argument_has_plain_help():
    for prog, action in _all_actions(build_parser()):
        assert action.help, f"{prog}: {action.dest} has no help"
        assert "``" not in action.help and ":class:" not in action.help, (prog, action.help)
    assert "``" not in build_parser().description


def test_rank_zero_is_one_error_and_exit_2():
    result = run_cli("inspect", "qwen2_vl", "-r", "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("error") == 1 and "positive integer" in result.stderr


def test_typo_in_model_type_suggests_the_right_one():
    result = run_cli("inspect", "qwen2vl")
    assert result.returncode == 2
    assert "did you mean 'qwen2_vl'" in result.stderr
    assert "llava_next" not in result.stderr  # no list of every model type when a close match exists
    assert result.stdout == ""


@pytest.mark.parametrize("command", [("inspect",), ("export",)])
def test_missing_folder_is_reported_as_such(command, tmp_path):
    missing = str(tmp_path / "no-such-adapter")
    result = run_cli(*command, missing, *([str(tmp_path / "out")] if command == ("export",) else []))
    assert result.returncode != 0
    assert f"folder not found: {missing}" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_folder_without_config_is_named(tmp_path):
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "no adapter_config.json" in result.stderr


def test_inspect_adapter_folder_without_the_base_model(tmp_path):
    config = VisionLoraConfig(r=4, finetune_projector=True, component_r={"vision": 2, "language": 6})
    model = get_peft_model(fresh_model("llava"), config)
    model.save_pretrained(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    result = run_cli("inspect", str(tmp_path / "adapter"))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    expected = {"vision": "2", "projector": "4", "language": "6"}
    for component, rank in expected.items():
        pattern = model.peft_config["default"].component_targets[component]
        params = sum(v.numel() for k, v in weights.items() if component_matches(k, pattern))
        assert rows[component][2] == rank, rows[component]
        assert int(rows[component][3].replace(",", "")) == params
    total = sum(v.numel() for v in weights.values())
    assert f"{total:,} trainable parameters" in result.stdout
    assert "component_r={'language': 6, 'vision': 2}" in result.stdout


def component_matches(key: str, pattern: str) -> bool:
    return ".lora_" in key and re.fullmatch(pattern, key.removeprefix("base_model.model.").split(".lora_")[0])


def test_inspect_model_type_still_works():
    result = run_cli("inspect", "paligemma", "-r", "8")
    assert result.returncode == 0, result.stderr
    assert "LoRA parameters per strategy at r=8" in result.stdout
