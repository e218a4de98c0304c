"""Training data for VLMs: loading your own data into chat rows, the chat collator that masks labels to the
assistant's replies, and what it knows about each processor family."""

from .chat_dataset import CHAT_FORMATS, ChatDataError, load_chat_dataset
from .collator import IGNORE_INDEX, VisionChatCollator
from .image_only import image_only_processor_class, load_processor, register_image_only_processors
from .recipes import (
    GENERIC_RECIPE,
    PROCESSOR_MODEL_TYPES,
    RECIPES,
    ChatRecipe,
    image_placeholder_ids,
    infer_model_type,
    recipe_for,
)

__all__ = [
    "CHAT_FORMATS",
    "GENERIC_RECIPE",
    "IGNORE_INDEX",
    "PROCESSOR_MODEL_TYPES",
    "RECIPES",
    "ChatDataError",
    "ChatRecipe",
    "VisionChatCollator",
    "image_placeholder_ids",
    "image_only_processor_class",
    "infer_model_type",
    "load_chat_dataset",
    "load_processor",
    "recipe_for",
]

# Folders saved by image-only processors (Qwen2-VL without torchvision) load with AutoProcessor.from_pretrained.
register_image_only_processors()
