"""How the tuner meets the rest of the stack: HF Trainer/TRL training, bitsandbytes quantization, FSDP sharding."""

from .loss import supervised_loss
from .quantization import prepare_vlm_for_kbit_training, vlm_bnb_config
from .sharding import fsdp_block_class_names, save_gathered_adapter
from .training import (
    ComponentLRMixin,
    VisionLoraTrainer,
    component_param_groups,
    create_optimizer,
    enable_gradient_checkpointing,
)

__all__ = [
    "ComponentLRMixin",
    "VisionLoraTrainer",
    "component_param_groups",
    "create_optimizer",
    "enable_gradient_checkpointing",
    "fsdp_block_class_names",
    "prepare_vlm_for_kbit_training",
    "save_gathered_adapter",
    "supervised_loss",
    "vlm_bnb_config",
]
