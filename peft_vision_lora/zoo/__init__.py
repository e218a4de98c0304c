"""Every image-text-to-text model type of transformers, built without a download: tiny and random-init on CPU, or
full-size on the meta device. Product code: ``peft-vision-lora inspect`` and the coverage table build from it; the
demo, examples, benchmarks and tests build their tiny VLMs with it.

- :mod:`.tiny`: 14 hand-tuned families that also run forward passes, with forward-ready batches;
- :mod:`.catalog`: every other type, shrunk generically (structure only), and full-size configs on meta.
"""

from .catalog import (
    FULL_SIZE_ASSUMED,
    MAX_TINY_PARAMS,
    ZOO_MODEL_TYPES,
    ZooBuildError,
    build_full_size_on_meta,
    build_zoo_model,
    count_parameters_on_meta,
    full_size_config,
    model_class,
    zoo_config,
)
from .tiny import SUPPORTED_TINY_MODEL_TYPES, build_tiny_vlm, tiny_config, tiny_inputs

__all__ = [
    "FULL_SIZE_ASSUMED",
    "MAX_TINY_PARAMS",
    "SUPPORTED_TINY_MODEL_TYPES",
    "ZOO_MODEL_TYPES",
    "ZooBuildError",
    "build_full_size_on_meta",
    "build_tiny_vlm",
    "build_zoo_model",
    "count_parameters_on_meta",
    "full_size_config",
    "model_class",
    "tiny_config",
    "tiny_inputs",
    "zoo_config",
]
