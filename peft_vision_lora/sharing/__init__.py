"""Getting adapters out: atomic saves, model cards, Hub uploads, plain-LoRA export, and the ``PeftModel`` hooks that
give ``save_pretrained``/``push_to_hub`` of our adapters all of that."""

from .atomic_save import save_adapter
from .card import write_model_card
from .export import export_lora
from .hub import push_adapter_to_hub

__all__ = ["export_lora", "push_adapter_to_hub", "save_adapter", "write_model_card"]
