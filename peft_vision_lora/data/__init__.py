"""Offline data for training VLMs: synthetic image-text tasks, processors built in code, and a chat collator."""

from .collator import IGNORE_INDEX, VisionChatCollator
from .processors import PROCESSOR_MODEL_TYPES, build_processor, build_tokenizer, image_placeholder_ids
from .synthetic import TASK_STRATEGY, TASKS, SyntheticVLMDataset, render_number, render_scene

__all__ = [
    "IGNORE_INDEX",
    "PROCESSOR_MODEL_TYPES",
    "TASKS",
    "TASK_STRATEGY",
    "SyntheticVLMDataset",
    "VisionChatCollator",
    "build_processor",
    "build_tokenizer",
    "image_placeholder_ids",
    "render_number",
    "render_scene",
]
