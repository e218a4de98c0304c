"""``save_pretrained``, ``push_to_hub`` and ``create_or_update_model_card`` of PEFT's ``PeftModel``, made to keep
``VISION_LORA`` adapters safe and described.

Why wrap methods of ``PeftModel``: all three belong to ``PeftModel`` (``push_to_hub`` to transformers'
``PushToHubMixin`` under it), and PEFT offers a tuner no hook inside them. Left alone,

- ``push_to_hub`` calls ``save_pretrained`` into a temporary folder and then overwrites ``README.md`` with the repo's
  card or a generic transformers template (``library_name: transformers``), so neither PEFT's card nor ours reaches
  the Hub;
- ``save_pretrained`` writes into the target folder in place, so a save that dies midway leaves a half-written
  adapter where the previous one was;
- ``Trainer.create_model_card`` replaces ``README.md`` with its training summary and then calls
  ``create_or_update_model_card``, which restores PEFT's metadata but not our section.

Each wrapper first asks whether the model holds a ``VISION_LORA`` adapter. If not, PEFT's method runs unchanged, so
other tuners behave exactly as without this package. If so, ``save_pretrained`` runs PEFT's own method on a staging
folder that replaces the target atomically (:func:`.atomic_save.atomic_save_folder`) and writes our card beside
each adapter (with ``portable=True`` each adapter is first rewritten as plain LoRA plus a sidecar, :mod:`.portable`),
``push_to_hub`` uploads through :func:`.hub.push_adapter_to_hub`, and ``create_or_update_model_card`` completes the
card after PEFT's update. :func:`install` runs once, when ``peft_vision_lora`` is imported; :func:`uninstall`
restores PEFT's methods.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from peft import PeftModel

from ..tuner.peft_type import PEFT_TYPE_NAME
from .atomic_save import atomic_save_folder, model_card_paths, writing_staged
from .card import add_tags, write_model_card
from .hub import push_adapter_to_hub
from .portable import make_folder_portable

_WRAPPED = "__peft_vision_lora_wrapper__"  # PEFT's method itself stays at `__wrapped__`
# Keyword arguments of transformers' PushToHubMixin.push_to_hub (5.x); all are honoured except max_shard_size,
# which does not apply: PEFT writes each adapter as one safetensors file.
PUSH_TO_HUB_OPTIONS = frozenset(
    {"commit_message", "commit_description", "private", "token", "revision", "create_pr", "max_shard_size", "tags"}
)


def vision_lora_adapters(model: PeftModel, selected: list[str] | None = None) -> dict[str, Any]:
    """The model's ``VISION_LORA`` adapter configs by name, among ``selected`` (all adapters when None)."""
    configs = getattr(model, "peft_config", None) or {}
    names = list(configs) if selected is None else [name for name in selected if name in configs]
    return {name: configs[name] for name in names if configs[name].peft_type == PEFT_TYPE_NAME}  # a str enum


def _save_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(
        self: PeftModel, save_directory: str, *args: Any, portable: bool = False, **kwargs: Any
    ) -> None:
        try:
            arguments = signature.bind(self, save_directory, *args, **kwargs).arguments
        except TypeError:
            return original(self, save_directory, *args, **kwargs)  # PEFT raises its own error
        selected = arguments.get("selected_adapters")
        ours = vision_lora_adapters(self, selected)
        if portable and not ours:
            raise ValueError("portable=True applies to VISION_LORA adapters; this model has none to convert.")
        if not arguments.get("is_main_process", True) or not ours:
            return original(self, save_directory, *args, **kwargs)
        # PiSSA & co. converted to LoRA on save: the saved adapter has rank 2r; describe it, not the live one
        converted = arguments.get("path_initial_model_for_weight_conversion") is not None
        if writing_staged():  # already inside a staging or scratch folder (save_adapter, push_to_hub)
            original(self, save_directory, *args, **kwargs)
            return _finish(Path(save_directory), ours, portable=portable, from_saved_config=converted)
        with atomic_save_folder(save_directory, updated_files=model_card_paths(self, selected)) as staged:
            original(self, str(staged), *args, **kwargs)
            return _finish(staged, ours, portable=portable, from_saved_config=converted)

    return save_pretrained


def _finish(folder: Path, adapters: dict[str, Any], *, portable: bool, from_saved_config: bool) -> None:
    """After PEFT's save: the portable rewrite if asked for, then our card beside each saved adapter, once its
    weights are written (PEFT's layout: the default adapter at the top, others in subfolders).

    ``from_saved_config``: describe the config PEFT wrote (it differs from the live one after a conversion)."""
    if portable:
        make_folder_portable(folder, adapters)
    for name, config in adapters.items():
        adapter_folder = folder if name == "default" else folder / name
        if from_saved_config:
            config = type(config).from_pretrained(str(adapter_folder))
        write_model_card(adapter_folder, config)


def _push_to_hub(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def push_to_hub(self: PeftModel, repo_id: str, **kwargs: Any) -> Any:
        if not vision_lora_adapters(self):
            return original(self, repo_id, **kwargs)
        unknown = sorted(set(kwargs) - PUSH_TO_HUB_OPTIONS)
        if unknown:
            accepted = sorted(PUSH_TO_HUB_OPTIONS)
            raise TypeError(f"push_to_hub() got unexpected keyword argument(s) {unknown}; it accepts {accepted}.")
        kwargs.pop("max_shard_size", None)
        return push_adapter_to_hub(self, repo_id, **kwargs)

    return push_to_hub


def _create_or_update_model_card(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        config = vision_lora_adapters(self, ["default"]).get("default")
        if config is None:
            return original(self, output_dir)
        readme = Path(output_dir) / "README.md"
        # PEFT replaces the card's tags with its own; keep those already there (added on the Hub, by a Trainer).
        kept_tags = (ModelCard.load(readme).data.tags or []) if readme.is_file() else []
        original(self, output_dir)
        add_tags(readme, kept_tags)
        # PEFT saves the default adapter at the top of the folder. No weights there yet (the start of a save, whose
        # config step writes the card later): nothing more to describe now.
        write_model_card(Path(output_dir), config)

    return create_or_update_model_card


_WRAPPERS = {
    "save_pretrained": _save_pretrained,
    "push_to_hub": _push_to_hub,
    "create_or_update_model_card": _create_or_update_model_card,
}


def installed() -> bool:
    """Whether ``PeftModel`` currently carries our wrappers."""
    return all(getattr(getattr(PeftModel, name), _WRAPPED, False) for name in _WRAPPERS)


def install() -> None:
    """Wrap the three methods on ``PeftModel`` (its subclasses inherit them); a second call changes nothing."""
    for name, wrap in _WRAPPERS.items():
        current = getattr(PeftModel, name)
        if getattr(current, _WRAPPED, False):
            continue
        wrapper = wrap(current)
        setattr(wrapper, _WRAPPED, True)
        setattr(PeftModel, name, wrapper)


def uninstall() -> None:
    """Put PEFT's own methods back (each wrapper keeps it at ``__wrapped__``); a second call changes nothing.

    Adapters of ours then save in place, without a card, and ``push_to_hub`` uploads transformers' generic card.
    """
    for name in _WRAPPERS:
        current = getattr(PeftModel, name)
        if getattr(current, _WRAPPED, False):
            setattr(PeftModel, name, current.__wrapped__)
