"""peft-vision-lora: a PEFT tuner for vision-language models, driven by component flags.

Importing this package registers the ``VISION_LORA`` PEFT type, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle :class:`VisionLoraConfig` adapters.
"""

# First, before anything imports peft (and with it bitsandbytes): importing it installs the log filter.
from . import quiet_imports  # noqa: F401

# isort: split
from .card import write_model_card
from .components import ComponentMap, ComponentResolutionError, resolve_components
from .config import COMPONENTS, TASK_PRESETS, VisionLoraConfig, VisionLoraConfigError
from .explain import ExplainRow, explain
from .export import export_lora
from .model import VisionLoraModel
from .quantization import prepare_vlm_for_kbit_training, quantized_footprint, vlm_bnb_config
from .registration import register_vision_lora
from .report import StrategyRow, print_strategy_report, strategy_report
from .saving import AdapterLoadError, push_adapter_to_hub, save_adapter
from .sharding import fsdp_block_class_names, save_gathered_adapter
from .supervised_loss import supervised_loss
from .targets import TargetPlan, compile_targets
from .training import (
    ComponentLRMixin,
    VisionLoraTrainer,
    component_param_groups,
    create_optimizer,
    enable_gradient_checkpointing,
)

register_vision_lora()

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "TASK_PRESETS",
    "AdapterLoadError",
    "ComponentLRMixin",
    "ComponentMap",
    "ComponentResolutionError",
    "ExplainRow",
    "StrategyRow",
    "TargetPlan",
    "VisionLoraConfig",
    "VisionLoraConfigError",
    "VisionLoraModel",
    "VisionLoraTrainer",
    "compile_targets",
    "component_param_groups",
    "create_optimizer",
    "enable_gradient_checkpointing",
    "explain",
    "export_lora",
    "fsdp_block_class_names",
    "prepare_vlm_for_kbit_training",
    "print_strategy_report",
    "push_adapter_to_hub",
    "quantized_footprint",
    "register_vision_lora",
    "resolve_components",
    "save_adapter",
    "save_gathered_adapter",
    "strategy_report",
    "supervised_loss",
    "vlm_bnb_config",
    "write_model_card",
]
