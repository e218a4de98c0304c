"""Model cards for saved adapters: Hub metadata, a table of adapted components, and how to load the adapter.

``PeftModel.save_pretrained`` first writes PEFT's README.md (``library_name: peft``, ``base_model``, tags, PEFT
version), then each adapter's config; ``VisionLoraConfig.save_pretrained`` ends by calling :func:`write_model_card`,
which reads the weights and config just written and completes the card. Everything on the card comes from files in
the folder, so the same function describes a plain-LoRA export. Our section sits between two HTML comments and is
replaced on the next save; text a user wrote outside it is kept.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from peft import __version__ as peft_version
from safetensors import safe_open

from ..resolve.names import COMPONENTS, OTHER
from ..tuner.config import SIDECAR_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
CARD_START = "<!-- peft-vision-lora card: start (regenerated on save) -->"
CARD_END = "<!-- peft-vision-lora card: end -->"
# The first comment of huggingface_hub's default template, which PEFT fills in: nothing a user wrote.
_HUB_TEMPLATE_MARKER = "<!-- Provide a quick summary of what the model is/does. -->"
FULL = "fully trained"  # modules_to_save rows


@dataclass(frozen=True)
class SavedComponentRow:
    """One component of a saved adapter, read from its weights: for the card, without the base model."""

    component: str
    modules: int
    ranks: tuple[int, ...]
    params: int


def _package_version() -> str:
    try:
        return metadata.version("peft-vision-lora")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def module_of(key: str) -> str:
    """``base_model.model.a.b.lora_A.weight`` -> ``a.b``; a modules_to_save key -> its parameter's module."""
    bare = key.removeprefix("base_model.model.")
    if ".lora_" in bare:
        return bare.split(".lora_", 1)[0]
    return bare.rsplit(".", 1)[0]


def saved_component_of(module: str, component_targets: dict[str, str]) -> str:
    """The component of a saved module, from the config's ``component_targets`` regexes (no model needed)."""
    for component, pattern in component_targets.items():
        if re.fullmatch(pattern, module):
            return component
    return OTHER


def saved_component_rows(
    shapes: dict[str, tuple[int, ...]], component_targets: dict[str, str]
) -> list[SavedComponentRow]:
    """Modules, ranks and parameter counts per component; fully trained modules (modules_to_save) get one row."""
    ranks: dict[str, int] = {}
    params: dict[str, int] = {}
    for key, shape in shapes.items():
        module = module_of(key)
        numel = 1
        for size in shape:
            numel *= size
        params[module] = params.get(module, 0) + numel
        if ".lora_A." in key:
            ranks[module] = shape[0]
    grouped: dict[str, list[str]] = {}
    for module in params:
        component = saved_component_of(module, component_targets) if module in ranks else FULL
        grouped.setdefault(component, []).append(module)
    order = [*COMPONENTS, OTHER, FULL]
    return [
        SavedComponentRow(
            component,
            len(grouped[component]),
            tuple(sorted({ranks[m] for m in grouped[component] if m in ranks})),
            sum(params[m] for m in grouped[component]),
        )
        for component in sorted(grouped, key=lambda c: order.index(c) if c in order else len(order))
    ]


def strategy_of(rows: list[SavedComponentRow]) -> str:
    """``vision-projector-language`` style name of what the adapter trains (the Hub tag's suffix)."""
    parts = [row.component for row in rows if row.component in COMPONENTS]
    if any(row.component == FULL for row in rows):
        parts.append("full-projector")
    return "-".join(parts) or "none"


def _table(rows: list[SavedComponentRow]) -> str:
    lines = ["| component | modules | rank | trainable parameters |", "|---|---:|---:|---:|"]
    for row in rows:
        rank = "full" if row.component == FULL else "/".join(str(r) for r in row.ranks)
        lines.append(f"| {row.component} | {row.modules} | {rank} | {row.params:,} |")
    lines.append(f"| **total** | {sum(r.modules for r in rows)} | | {sum(r.params for r in rows):,} |")
    return "\n".join(lines)


def _load_snippets(
    base_model: str, adapter: str, plain_lora: bool, subfolder: str | None, portable: bool = False
) -> str:
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    load = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForImageTextToText\n\n"
        f'base = AutoModelForImageTextToText.from_pretrained("{base_model}")\n'
        f'model = PeftModel.from_pretrained(base, "{adapter}"{sub})\n'
    )
    if portable:
        return (
            "**With PEFT alone** (no peft-vision-lora, any serving stack that reads PEFT LoRA): `adapter_config.json` "
            f"is plain LoRA (`peft_type: LORA`).\n\n```python\n{load}```\n\n"
            "**With peft-vision-lora** (`pip install peft-vision-lora`): the same call after `import "
            "peft_vision_lora` restores the full `VisionLoraConfig` (component flags, per-component ranks) from "
            "`vision_lora_config.json`.\n\n"
            f"```python\nimport peft_vision_lora  # noqa: F401\n{load}```\n"
        )
    if plain_lora:
        return (
            "This folder is plain PEFT LoRA (`peft_type: LORA`, exported by peft-vision-lora): PEFT alone loads "
            f"it.\n\n```python\n{load}```\n"
        )
    return (
        "**With peft-vision-lora** (`pip install peft-vision-lora`), importing the package registers the "
        f"`VISION_LORA` adapter type with PEFT:\n\n```python\nimport peft_vision_lora  # noqa: F401\n{load}```\n\n"
        "**Without it**, export a plain LoRA copy once (same weights, `peft_type: LORA`), then load that with PEFT "
        "alone, as above without the import:\n\n"
        f"```bash\npeft-vision-lora export {adapter} ./plain-lora\n"
        f"peft-vision-lora export {adapter} ./plain-lora-language --language-only --fold-scaling"
        "  # for servers such as vLLM\n```\n\n"
        "`--language-only` keeps only the language-model adapters, for serving stacks that accept LoRA only on the "
        "language model; `--fold-scaling` folds each module's `alpha/r` into its `lora_B`, for loaders that ignore "
        "`rank_pattern`/`alpha_pattern`.\n"
    )


def _settings(config: Any) -> str:
    facts = [f"r={config.r}", f"lora_alpha={config.lora_alpha}"]
    for name in ("task", "component_r", "component_alpha", "finetune_projector"):
        value = getattr(config, name, None)
        if value not in (None, {}, False):
            facts.append(f"{name}={value!r}")
    for name in ("use_rslora", "use_dora"):
        if getattr(config, name, False):
            facts.append(f"{name}=True")
    return ", ".join(facts)


NEEDS_PACKAGE = (
    "> **Loading this folder needs peft-vision-lora**: its `adapter_config.json` says `peft_type: VISION_LORA`, "
    "so PEFT alone fails with `KeyError: 'VISION_LORA'`. Run `pip install peft-vision-lora` and "
    "`import peft_vision_lora` before loading, or use a copy that loads anywhere: "
    "`model.save_pretrained(dir, portable=True)`, `model.push_to_hub(...)` or `peft-vision-lora export`."
)


def render_card_section(
    rows: list[SavedComponentRow],
    config: Any,
    *,
    adapter: str,
    plain_lora: bool,
    subfolder: str | None = None,
    portable: bool = False,
) -> str:
    base_model = config.base_model_name_or_path or "BASE_MODEL"
    total = sum(r.params for r in rows)
    kind = "Plain LoRA export of a peft-vision-lora adapter" if plain_lora else "peft-vision-lora adapter"
    if portable:
        kind = "peft-vision-lora adapter (portable: plain LoRA for PEFT alone)"
    warning = [] if (plain_lora or portable) else [NEEDS_PACKAGE, ""]
    return "\n".join(
        [
            CARD_START,
            f"# {kind} for `{base_model}`",
            "",
            *warning,
            f"LoRA on the vision-language model's components ({strategy_of(rows)}): {total:,} trainable parameters "
            f"in {sum(r.modules for r in rows)} modules. Settings: {_settings(config)}.",
            "",
            "## Adapted components",
            "",
            _table(rows),
            "",
            "## How to load",
            "",
            _load_snippets(base_model, adapter, plain_lora, subfolder, portable),
            "### Framework versions",
            "",
            f"- PEFT {peft_version}",
            f"- peft-vision-lora {_package_version()}",
            CARD_END,
        ]
    )


def _merge_text(existing: str, section: str) -> str:
    if CARD_START in existing and CARD_END in existing:
        head, rest = existing.split(CARD_START, 1)
        return head + section + rest.split(CARD_END, 1)[1]
    if _HUB_TEMPLATE_MARKER in existing or not existing.strip():
        return "\n" + section + "\n"
    return existing.rstrip() + "\n\n" + section + "\n"


def add_tags(readme: str | os.PathLike, tags: list[str]) -> None:
    """Add ``tags`` to the metadata of the card at ``readme``, keeping those it has (sorted, no repeats)."""
    card = ModelCard.load(readme)
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    card.save(readme)


def write_model_card(
    directory: str | os.PathLike,
    config: Any,
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    component_targets: dict[str, str] | None = None,
) -> Path | None:
    """Complete ``directory/README.md`` for the adapter saved there; returns its path (None: no weights there).

    ``component_targets`` defaults to ``config.component_targets``; ``repo_id`` goes into the loading snippets.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return None
    targets = component_targets if component_targets is not None else getattr(config, "component_targets", {})
    rows = saved_component_rows(weight_shapes(weights), targets or {})
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    plain_lora = peft_type == "LORA"
    readme = directory / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else ModelCard("---\nlibrary_name: peft\n---\n")
    data = card.data
    data.library_name = "peft"
    if config.base_model_name_or_path:
        data.base_model = config.base_model_name_or_path
    elif not data.base_model:  # PEFT writes base_model: '' for models built from a config: invalid on the Hub
        data.base_model = None
    if not data.pipeline_tag:
        data.pipeline_tag = "image-text-to-text"
    ours = {"peft", "lora", "vision-lora", f"vision-lora-strategy:{strategy_of(rows)}"}
    tags = {t for t in data.tags or [] if t != "base_model:adapter:"} | ours
    data.tags = sorted(tags)
    portable = (directory / SIDECAR_NAME).is_file()  # see peft_vision_lora.sharing.portable
    section = render_card_section(
        rows,
        config,
        adapter=repo_id or "path/to/adapter",
        plain_lora=plain_lora and not portable,
        subfolder=subfolder,
        portable=portable,
    )
    card.text = _merge_text(card.text, section)
    card.save(readme)
    return readme
