"""Image-only processors: load and save a VLM processor whose video half needs torchvision, without torchvision.

Qwen2-VL, Qwen2.5-VL and SmolVLM processors hold a video processor, and transformers can neither build nor load one
without torchvision, even to train on images. ``image_only_processor_class(cls)`` is ``cls`` without its video
processor; it saves under its own name (``ImageOnlyQwen2VLProcessor``), which importing this module registers with
``AutoProcessor``, so such a folder round-trips through ``save_pretrained`` / ``AutoProcessor.from_pretrained``.
:func:`load_processor` also loads a checkpoint's regular processor image-only when its video processor cannot load.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, PretrainedConfig, ProcessorMixin

__all__ = ["IMAGE_ONLY_PREFIX", "image_only_processor_class", "load_processor", "register_image_only_processors"]

IMAGE_ONLY_PREFIX = "ImageOnly"
# Processors that hold a torchvision-only video processor; their image-only variants are registered on import.
VIDEO_PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "SmolVLMProcessor")


@functools.cache
def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` accepting ``video_processor=None``: video processors need torchvision, images do not."""

    class ImageOnlyProcessor(cls):
        @classmethod
        def from_args_and_dict(cls, args: Any, processor_dict: dict[str, Any], **kwargs: Any) -> Any:
            # SmolVLM's __init__ requires the argument; loading passes only the attributes it loaded
            return super().from_args_and_dict(args, {**processor_dict, "video_processor": None}, **kwargs)

        @classmethod
        def get_attributes(cls) -> list[str]:  # the None video processor is neither checked, set, saved nor loaded
            return [name for name in super().get_attributes() if name != "video_processor"]

        def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
            # SmolVLM's override reads video-processor defaults; the generic one only renders the template.
            return ProcessorMixin.apply_chat_template(self, conversation, *args, **kwargs)

    name = IMAGE_ONLY_PREFIX + cls.__name__
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = name
    _register(name, ImageOnlyProcessor)
    return ImageOnlyProcessor


class _LazyImageOnly:
    """What ``AutoProcessor`` finds under an image-only name before the class is built (building imports the model's
    processing module, seconds that an import of this package should not cost)."""

    __module__ = __name__

    def __init__(self, base_name: str) -> None:
        self.__name__ = IMAGE_ONLY_PREFIX + base_name
        self.base_name = base_name

    def from_pretrained(self, *args: Any, **kwargs: Any) -> ProcessorMixin:
        import transformers

        kwargs.pop("trust_remote_code", None)
        return image_only_processor_class(getattr(transformers, self.base_name)).from_pretrained(*args, **kwargs)


def _register(name: str, processor_class: Any) -> None:
    # AutoProcessor resolves a saved "processor_class" among registered processors by name; the key is a config class
    # of our own, so no transformers model's processor lookup changes.
    key = type(f"_{name}Key", (PretrainedConfig,), {"model_type": f"peft_vision_lora_{name.lower()}"})
    AutoProcessor.register(key, processor_class, exist_ok=True)


@functools.cache
def register_image_only_processors() -> None:
    """Make ``AutoProcessor`` load folders saved by image-only processors (idempotent; run on import)."""
    for base_name in VIDEO_PROCESSOR_CLASSES:
        _register(IMAGE_ONLY_PREFIX + base_name, _LazyImageOnly(base_name))


def load_processor(path: str | os.PathLike, **kwargs: Any) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained(path, **kwargs)``, falling back to the image-only processor when the
    checkpoint's video processor cannot load (no torchvision). ``kwargs`` reach the image processor, e.g.
    ``max_pixels=...``."""
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        if "video" not in str(error).lower() and "torchvision" not in str(error).lower():
            raise
        import transformers

        name = _saved_processor_class(Path(path))
        cls = getattr(transformers, name, None) if name else None
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        return image_only_processor_class(cls).from_pretrained(path, **kwargs)


def _saved_processor_class(folder: Path) -> str | None:
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / file).is_file():
            name = json.loads((folder / file).read_text()).get("processor_class")
            if name:
                return name
    return None
