"""What a saved adapter folder holds, from its files alone: components, ranks and parameter counts.

``peft-vision-lora inspect ADAPTER_DIR`` prints it. Nothing is built and no base model is needed: the config comes
from ``adapter_config.json`` (or, for a portable folder, the full config in ``vision_lora_config.json``), the ranks
and parameter counts from the safetensors header, and the component of each module from the config's
``component_targets`` (recorded when the adapter was injected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME

from ..sharing.card import FULL, WEIGHTS_NAME, saved_component_rows, weight_shapes
from ..tuner.config import SIDECAR_NAME  # see peft_vision_lora.sharing.portable

_FLAGS = (
    "task",
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
    "finetune_projector",
    "finetune_cross_attention",
    "finetune_qformer",
    "finetune_audio_layers",
    "component_r",
    "component_alpha",
    "component_layers",
    "kernel",
)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The folder's ``adapter_config.json`` and, when the folder is portable, the full config beside it."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    sidecar = folder / SIDECAR_NAME
    return config, (json.loads(sidecar.read_text()) if sidecar.is_file() else None)


def adapter_summary(folder: str | Path) -> str:
    """The text ``inspect`` prints for an adapter folder (raises FileNotFoundError without weights)."""
    folder = Path(folder)
    config, full = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; adapters saved as .bin are not read: re-save with "
            "safe_serialization=True."
        )
    described = full or config
    rows = saved_component_rows(weight_shapes(weights), described.get("component_targets") or {})
    peft_type = config.get("peft_type")
    kind = f"peft_type {peft_type}" + (f", portable (full config: {full.get('peft_type')})" if full else "")
    lines = [
        f"adapter {folder} ({kind}), base model {config.get('base_model_name_or_path') or 'not recorded'}:",
        f"{sum(r.params for r in rows):,} trainable parameters in {sum(r.modules for r in rows)} modules, "
        f"r={config.get('r')}, lora_alpha={config.get('lora_alpha')}",
        "",
        f"{'component':<16} {'modules':>7} {'rank':>9} {'params':>15}",
    ]
    for row in rows:
        rank = "full" if row.component == FULL else "/".join(map(str, row.ranks))
        lines.append(f"{row.component:<16} {row.modules:>7} {rank:>9} {row.params:>15,}")
    flags = {name: described[name] for name in _FLAGS if described.get(name) not in (None, {}, [])}
    if flags:
        lines += ["", "settings: " + ", ".join(f"{k}={v!r}" for k, v in flags.items())]
    if not described.get("component_targets"):
        lines += ["", "(no component_targets in the config: modules are listed as 'other')"]
    return "\n".join(lines)
