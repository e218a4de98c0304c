"""Mixed-adapter batches (`model(..., adapter_names=[...])`) where a vision tower's rows are not the samples.

PEFT's `LoraModel._enable_peft_forward_hooks` gives every LoRA layer the per-sample list, and each layer indexes its
input's first dimension with it. That holds in the language model only: a tower sees images, flattened patches,
tiles, crops or video frames. On top of PEFT's hooks (kept for their checks and for `modules_to_save`) we add:

1. a pre-hook on the base model's forward that reads that call's inputs and asks `resolve.batch_rows` which sample
   each tower position belongs to (`image_grid_thw`, placeholder counts in `input_ids`, tiles, ...), with the
   per-sample names expanded to the call's batch (generate repeats each sample `num_beams` or
   `num_return_sequences` times);
2. a pre-hook on every LoRA layer that passes the list for the unit whose length matches its input: per sample in
   the language model, per image/patch/tile/... elsewhere. When two units of that length map positions to
   different samples the call is refused rather than guessed.

`mixed_lora_forward` is the layer side: it accepts one name per leading row or one per token (Pixtral runs all
patches as one row), and runs each adapter's rows through our fused kernels, `__base__` rows through the plain
Linear, so a mixed batch costs one pass over the input like a single-adapter one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from ..kernels.dispatch import lora_linear
from ..resolve.batch_rows import MixedBatchError, leading_size, sample_units
from ..resolve.components import resolve_components
from ..resolve.names import OTHER

__all__ = ["MixedBatchError", "mixed_batch_hooks", "mixed_lora_forward"]

BASE = "__base__"


@dataclass
class _CallState:
    """The inputs of the current base-model call, and per unit the adapter name of each position (computed lazily,
    on the first layer outside the language model: a text-only adapter never needs the tower mapping)."""

    model_type: str
    config: Any
    sample_names: list[str]
    inputs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    names: dict[str, list[str]] | None = None

    def start_call(self, inputs: dict[str, Any], batch_size: int) -> None:
        self.inputs, self.batch_size, self.names = inputs, batch_size, None

    def rows(self, batch_size: int) -> list[str]:
        """Per-sample names for a batch of `batch_size` rows: generate repeats each sample in place (beams,
        num_return_sequences)."""
        samples = len(self.sample_names)
        if batch_size % samples:
            raise MixedBatchError(
                f"{self.model_type}: got {samples} adapter_names for a batch of {batch_size} rows; pass one name per "
                "sample."
            )
        return [name for name in self.sample_names for _ in range(batch_size // samples)]

    def _unit_names(self) -> dict[str, list[str]]:
        if self.names is None:
            rows = self.rows(self.batch_size)
            units = sample_units(self.config, self.inputs, self.batch_size)
            self.names = {unit: [rows[i] for i in positions] for unit, positions in units.items()}
        return self.names

    def names_for(self, layer_name: str, component: str | None, x: torch.Tensor) -> list[str]:
        if component == "language":
            return self.rows(x.shape[0])  # the text batch is the samples' batch (beams included)
        candidates = dict(self._unit_names())
        if component == "cross_attention":  # queries come from the text rows, keys/values from the tower's tiles
            candidates.setdefault("row", self.rows(self.batch_size))
        sizes = {x.shape[0], leading_size(x.shape)}
        matches = {unit: names for unit, names in candidates.items() if len(names) in sizes}
        distinct = {tuple(names) for names in matches.values()}
        if len(distinct) == 1:
            return next(iter(matches.values()))
        known = ", ".join(f"{unit}={len(names)}" for unit, names in candidates.items())
        if not distinct:
            raise MixedBatchError(
                f"{self.model_type}: layer {layer_name!r} ({component or OTHER}) got an input of shape "
                f"{tuple(x.shape)}, which matches none of this batch's row units ({known}); the mapping of its rows "
                "to samples is unknown, so mixed-adapter batches are not supported for it. Run one adapter per batch."
            )
        raise MixedBatchError(
            f"{self.model_type}: layer {layer_name!r} got {tuple(x.shape)}, and units {sorted(matches)} of that "
            f"length map its rows to different samples ({known}); split this batch (e.g. one image per row) or run "
            "one adapter per batch."
        )


def _call_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    import inspect

    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    inputs = dict(bound.arguments)
    inputs.update(inputs.pop("kwargs", {}) or {})
    return inputs


def _base_pre_hook(state: _CallState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    inputs = _call_inputs(module, args, kwargs)
    reference = inputs.get("input_ids")
    if reference is None:
        reference = inputs.get("inputs_embeds")
    batch_size = len(state.sample_names) if reference is None else reference.shape[0]
    state.start_call(inputs, batch_size)


def _layer_pre_hook(
    state: _CallState, name: str, component: str | None, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs["x"]
    kwargs["adapter_names"] = state.names_for(name, component, x)
    return args, kwargs


@contextmanager
def mixed_batch_hooks(model: nn.Module, adapter_names: Sequence[str], inputs: dict[str, Any]) -> Iterator[None]:
    """Route each position of every LoRA layer's input to its sample's adapter, for the calls inside the block.

    `inputs` are the keyword arguments of the `forward`/`generate` call: they stand in for the base model's own call
    when a generate runs its towers without one (BLIP-2, Kosmos-2 call the tower, then the language model).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of str, one per sample; got {adapter_names!r}")
    components = resolve_components(model)
    state = _CallState(getattr(model.config, "model_type", type(model).__name__), model.config, list(adapter_names))
    state.start_call(dict(inputs), len(state.sample_names))
    with ExitStack() as stack:
        handle = model.register_forward_pre_hook(partial(_base_pre_hook, state), with_kwargs=True)
        stack.callback(handle.remove)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                hook = partial(_layer_pre_hook, state, name, components.component_of(name))
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
                stack.callback(handle.remove)
        yield


# ---- the layer side ----------------------------------------------------------------------------------------------


def per_token_names(x: torch.Tensor, adapter_names: Sequence[str]) -> list[str] | None:
    """One name per token of `x`, from one per leading row or one per token; None when neither fits."""
    tokens = leading_size(x.shape)
    if len(adapter_names) == tokens:
        return list(adapter_names)
    if x.dim() > 1 and len(adapter_names) == x.shape[0]:
        per_row = tokens // x.shape[0]
        return [name for name in adapter_names for _ in range(per_row)]
    return None


def mixed_lora_forward(layer: Any, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
    """Each adapter's tokens through the fused kernel, the rest through the base Linear; eval-mode (no dropout).

    Exactly what running each group alone computes: the base product of a row does not depend on the other rows.
    """
    names = per_token_names(x, adapter_names)
    if names is None:
        raise MixedBatchError(
            f"Length of `adapter_names` ({len(adapter_names)}) matches neither the rows ({x.shape[0]}) nor the "
            f"tokens ({leading_size(x.shape)}) of an input of shape {tuple(x.shape)}."
        )
    base = layer.get_base_layer()
    flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
    out = flat.new_empty(flat.shape[0], base.out_features)  # (tokens, out)
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name, []).append(index)
    for name, indices in groups.items():
        whole = len(indices) == flat.shape[0]
        index = torch.tensor(indices, device=x.device)
        rows = flat if whole else flat.index_select(0, index)
        if name != BASE and name in layer.lora_A:
            lora_A = layer.lora_A[name].weight.to(x.dtype)
            lora_B = layer.lora_B[name].weight.to(x.dtype)
            kernel = layer.lora_kernel.get(name, "auto")
            y = lora_linear(rows, base.weight, base.bias, lora_A, lora_B, layer.scaling[name], 0.0, False, kernel)
        else:
            y = F.linear(rows, base.weight, base.bias)  # "__base__", or an adapter that does not touch this layer
        if whole:
            out = y
        else:
            out.index_copy_(0, index, y)
    return out.reshape(*x.shape[:-1], base.out_features)
