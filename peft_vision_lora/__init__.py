"""peft-vision-lora: a PEFT tuner for vision-language models, driven by component flags.

Importing this package registers the ``VISION_LORA`` PEFT type, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle :class:`VisionLoraConfig` adapters.
"""

from .components import ComponentMap, ComponentResolutionError, resolve_components
from .config import COMPONENTS, TASK_PRESETS, VisionLoraConfig, VisionLoraConfigError
from .explain import ExplainRow, explain
from .model import VisionLoraModel
from .registration import register_vision_lora
from .report import StrategyRow, print_strategy_report, strategy_report
from .targets import TargetPlan, compile_targets

register_vision_lora()

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "TASK_PRESETS",
    "ComponentMap",
    "ComponentResolutionError",
    "ExplainRow",
    "StrategyRow",
    "TargetPlan",
    "VisionLoraConfig",
    "VisionLoraConfigError",
    "VisionLoraModel",
    "compile_targets",
    "explain",
    "print_strategy_report",
    "register_vision_lora",
    "resolve_components",
    "strategy_report",
]
