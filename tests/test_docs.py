"""``make docs``: the site builds offline with --strict and names every public symbol; every config field is
documented in ``VisionLoraConfig``'s docstring."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

import peft_vision_lora
from peft_vision_lora import VisionLoraConfig

ROOT = Path(__file__).resolve().parent.parent


def test_every_vision_lora_field_is_in_the_class_docstring():
    ours = {f.name for f in dataclasses.fields(VisionLoraConfig)} - {f.name for f in dataclasses.fields(LoraConfig)}
    ours |= {"target_modules"}  # redefined with another default and meaning
    documented = set(re.findall(r"^        (\w+): ", VisionLoraConfig.__doc__, flags=re.MULTILINE))
    assert ours - documented == set(), "fields missing from the docstring"
    assert documented - ours - {"target_modules"} == set(), "docstring names fields that do not exist"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings[python] are not installed (pip install -e '.[docs]')",
)
def test_site_builds_strictly_and_names_every_public_symbol(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "index.html").read_text()
    missing = [name for name in peft_vision_lora.__all__ if f'id="peft_vision_lora.{name}"' not in page]
    assert missing == []
    for field in ("finetune_projector", "component_layers", "kernel"):  # the Args section is rendered
        assert field in page
