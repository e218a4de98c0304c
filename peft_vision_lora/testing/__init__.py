"""Offline fixtures for tests, the demo, examples and benchmarks: processors built in code for the tiny VLMs and
synthetic image-text tasks. Product code never imports this package (the tiny models themselves are in ``zoo``)."""

from .processors import PROCESSOR_MODEL_TYPES, build_processor, build_tokenizer
from .synthetic import TASK_STRATEGY, TASKS, SyntheticVLMDataset, render_number, render_scene

__all__ = [
    "PROCESSOR_MODEL_TYPES",
    "TASKS",
    "TASK_STRATEGY",
    "SyntheticVLMDataset",
    "build_processor",
    "build_tokenizer",
    "render_number",
    "render_scene",
]
