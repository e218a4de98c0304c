"""peft-vision-lora: a PEFT tuner for vision-language models, driven by component flags.

Importing this package registers the ``VISION_LORA`` PEFT type, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle :class:`VisionLoraConfig` adapters.
"""

# First, before anything imports peft (and with it bitsandbytes): importing it installs the log filter.
from . import quiet_imports  # noqa: F401

# isort: split
from .data import ChatDataError, VisionChatCollator, load_chat_dataset, load_processor
from .errors import AdapterLoadError, ComponentResolutionError, VisionLoraConfigError
from .integrations.loss import supervised_loss
from .integrations.quantization import prepare_vlm_for_kbit_training, vlm_bnb_config
from .integrations.sharding import fsdp_block_class_names, save_gathered_adapter
from .integrations.training import (
    ComponentLRMixin,
    VisionLoraTrainer,
    component_param_groups,
    create_optimizer,
    enable_gradient_checkpointing,
)
from .reports.explain import ExplainRow, explain, skipped_modules
from .reports.memory import quantized_footprint
from .reports.strategies import StrategyRow, print_strategy_report, strategy_report
from .resolve.components import ComponentMap, resolve_components
from .resolve.names import COMPONENTS
from .resolve.targets import TargetPlan, compile_targets
from .sharing import peft_model_hooks, portable
from .sharing.atomic_save import save_adapter
from .sharing.card import write_model_card
from .sharing.export import export_lora
from .sharing.hub import push_adapter_to_hub
from .tuner.config import TASK_PRESETS, VisionLoraConfig
from .tuner.initializations import eva_layer_inputs, eva_model_inputs, initialize_eva_weights, resolve_targets
from .tuner.model import VisionLoraModel
from .tuner.registration import register_vision_lora

register_vision_lora()
# Atomic saves and our model card for PeftModels that hold a VISION_LORA adapter (see sharing/peft_model_hooks.py).
peft_model_hooks.install()
# Portable adapter folders (plain LoRA + sidecar) load back as VISION_LORA (see sharing/portable.py).
portable.install()

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "TASK_PRESETS",
    "AdapterLoadError",
    "ChatDataError",
    "ComponentLRMixin",
    "ComponentMap",
    "ComponentResolutionError",
    "ExplainRow",
    "StrategyRow",
    "TargetPlan",
    "VisionLoraConfig",
    "VisionLoraConfigError",
    "VisionChatCollator",
    "VisionLoraModel",
    "VisionLoraTrainer",
    "compile_targets",
    "component_param_groups",
    "create_optimizer",
    "enable_gradient_checkpointing",
    "eva_layer_inputs",
    "eva_model_inputs",
    "explain",
    "export_lora",
    "fsdp_block_class_names",
    "initialize_eva_weights",
    "load_chat_dataset",
    "load_processor",
    "prepare_vlm_for_kbit_training",
    "print_strategy_report",
    "push_adapter_to_hub",
    "quantized_footprint",
    "register_vision_lora",
    "resolve_components",
    "resolve_targets",
    "save_adapter",
    "save_gathered_adapter",
    "skipped_modules",
    "strategy_report",
    "supervised_loss",
    "vlm_bnb_config",
    "write_model_card",
]
