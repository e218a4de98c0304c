"""FSDP2 for VLM adapters through accelerate: which blocks to shard, CPU runs, and saving the gathered adapter.

accelerate shards with ``fully_shard`` per block class (``fsdp_transformer_layer_cls_to_wrap``) and defaults to the
model's ``_no_split_modules``, which for a VLM mixes blocks with embeddings (LLaVA: ``CLIPVisionEmbeddings``,
``CLIPTextEmbeddings``). :func:`fsdp_block_class_names` names the repeated blocks of each tower instead (decoder
layers, vision encoder layers, Q-Former layers), found structurally from :func:`resolve_components`.

After sharding, every parameter is a ``DTensor`` shard: ``PeftModel.save_pretrained`` would write rank-local shards.
:func:`save_gathered_adapter` gathers only the adapter tensors (not the frozen base) and writes one ordinary PEFT
adapter from the main process, loadable on a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..resolve.components import resolve_components, unwrap_model

# Towers whose repeated blocks become FSDP units. The projector is small and stays with the root unit.
_SHARDED_COMPONENTS = ("vision", "language", "qformer", "audio")


def _block_lists(tower: nn.Module) -> list[nn.ModuleList]:
    """The outermost ``ModuleList``s of a tower (its layer stacks), not those nested inside their blocks."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in tower.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return [module for _, module in found]


def fsdp_block_class_names(model: nn.Module) -> list[str]:
    """Class names of the repeated blocks in the vision tower(s), language model, Q-Former and audio tower.

    Pass them as accelerate's ``fsdp_transformer_layer_cls_to_wrap`` (or set
    ``accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap`` before ``prepare``): each block becomes one FSDP
    unit, gathered just before it runs. Mllama's decoder has two block classes (self- and cross-attention); both
    are named.
    """
    base = unwrap_model(model)
    components = resolve_components(base)
    names: list[str] = []
    for component in _SHARDED_COMPONENTS:
        for path in components[component]:
            for stack in _block_lists(base.get_submodule(path)):
                for block in stack:
                    if any(True for _ in block.parameters()) and type(block).__name__ not in names:
                        names.append(type(block).__name__)
    if not names:
        raise ValueError(
            f"No repeated blocks found in the towers of {components.describe()}; set "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config by hand."
        )
    return names


def enable_fsdp_on_cpu(accelerator: Any) -> bool:
    """Let accelerate's own FSDP2 path shard on CPU processes (gloo), as the launch config asks.

    ``accelerate launch`` with ``distributed_type: FSDP`` exports the FSDP settings to the environment, but accelerate
    (1.15) only turns FSDP on for accelerator devices: CPU processes become ``MULTI_CPU`` (DDP). This switches such
    a state to FSDP with the plugin read from that environment, so ``accelerator.prepare`` runs
    ``fsdp2_prepare_model`` exactly as on GPUs. On GPUs, or without an FSDP launch config, it changes nothing.
    Returns whether FSDP is active. Call it right after creating the ``Accelerator(cpu=True)``.
    """
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from env
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState re-reads PartialState on every construction; accelerate syncs the two the same way on GPUs
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def set_vlm_wrap_policy(accelerator: Any, model: nn.Module) -> list[str]:
    """Shard the model's tower blocks (see :func:`fsdp_block_class_names`) unless the launch config names classes."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return []
    if plugin.transformer_cls_names_to_wrap:
        return list(plugin.transformer_cls_names_to_wrap)
    plugin.transformer_cls_names_to_wrap = fsdp_block_class_names(model)
    return plugin.transformer_cls_names_to_wrap


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather a DTensor shard (a collective: every rank must call it); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def _adapter_source_keys(model: nn.Module, state_dict: dict[str, Any], adapter_name: str) -> list[str]:
    """The state-dict keys PEFT would save for ``adapter_name`` (LoRA weights, biases per ``bias=``, modules_to_save,
    trainable tokens): PEFT's own selection, run on the sharded state dict and mapped back by tensor identity."""
    from peft import get_peft_model_state_dict

    selected = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    keys_of: dict[int, list[str]] = {}
    for key, value in state_dict.items():
        keys_of.setdefault(id(value), []).append(key)
    unknown = [key for key, value in selected.items() if id(value) not in keys_of]
    if unknown:
        raise RuntimeError(f"PEFT selected tensors that are not in the model's state dict: {unknown[:5]}")
    return sorted({key for value in selected.values() for key in keys_of[id(value)]})


def gathered_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's full tensors (CPU) under the PeftModel's state-dict keys; only adapter tensors are gathered.

    A collective under FSDP: call it on every rank.
    """
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"No adapter {adapter_name!r} on this model; is it the prepared PeftModel?")
    state_dict = model.state_dict()  # DTensor shards under FSDP2: nothing is gathered yet
    return {key: _full(state_dict[key]) for key in _adapter_source_keys(model, state_dict, adapter_name)}


def save_gathered_adapter(
    model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool, adapter_name: str = "default"
) -> None:
    """Save a sharded PeftModel's adapter as one ordinary PEFT adapter (call on every rank; the main one writes).

    ``model`` is what ``accelerator.prepare`` returned (a PeftModel sharded in place by FSDP2).
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError(f"save_gathered_adapter needs the prepared PeftModel, got {type(model).__name__}.")
    state_dict = gathered_adapter_state_dict(model, adapter_name)
    if is_main_process:
        model.save_pretrained(save_directory, state_dict=state_dict, selected_adapters=[adapter_name])
