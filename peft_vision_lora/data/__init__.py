"""Training data for VLMs: the chat collator that masks labels to the assistant's replies, and what it knows about
each processor family."""

from .collator import IGNORE_INDEX, VisionChatCollator
from .recipes import PROCESSOR_MODEL_TYPES, RECIPES, ChatRecipe, image_placeholder_ids

__all__ = [
    "IGNORE_INDEX",
    "PROCESSOR_MODEL_TYPES",
    "RECIPES",
    "ChatRecipe",
    "VisionChatCollator",
    "image_placeholder_ids",
]
