"""Training helpers: per-component learning rates for any optimizer or Trainer, and gradient checkpointing that keeps
vision adapters learning.

Per-component learning rates: the vision tower, projector and language model of a VLM were pretrained separately
and often want different step sizes (a common recipe: vision lower than language, a fully trained projector
higher). ``component_lr={"vision": 2e-5, "projector": 1e-4, "language": 2e-4}`` becomes one optimizer parameter
group per component (each split into decayed / not decayed), usable three ways:

- ``create_optimizer(model, component_lr, lr=...)`` -> a torch optimizer, e.g. for ``Trainer(optimizers=(opt, None))``;
- ``VisionLoraTrainer(..., component_lr=...)``, a ``Trainer`` whose ``create_optimizer`` builds the groups with the
  optimizer ``TrainingArguments.optim`` names;
- ``ComponentLRMixin`` to add the same to another Trainer subclass (TRL's ``SFTTrainer``).

Gradient checkpointing: with reentrant checkpointing, a checkpointed block's output requires grad only if one of its
*inputs* does. With frozen embeddings nothing does, so unless a hook makes the embedding output require grad, the
adapters inside get no gradient. Tools that hook only the language model's embeddings silently freeze vision LoRA.
:func:`enable_gradient_checkpointing` hooks every checkpointed block that holds trainable parameters instead, so it
does not depend on which embeddings a model exposes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Trainer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..resolve.components import resolve_components, unwrap_model
from ..resolve.names import OTHER, check_known_components
from .loss import supervised_loss, trainer_supervised_loss

__all__ = [
    "COLLATOR_COLUMNS",
    "ComponentLRMixin",
    "VisionLoraTrainer",
    "component_param_groups",
    "create_optimizer",
    "enable_gradient_checkpointing",
    "parameter_components",
    "supervised_loss",
]


# Dataset columns a VLM chat collator reads; the model's forward takes none of them.
COLLATOR_COLUMNS = ("images", "messages")


def parameter_components(model: nn.Module) -> dict[str, str]:
    """Component of every trainable parameter, keyed by its name in ``model`` (a PeftModel or the base model)."""
    base = unwrap_model(model)
    components = resolve_components(base)
    by_id = {id(p): components.component_of(name.rsplit(".", 1)[0]) or OTHER for name, p in base.named_parameters()}
    return {name: by_id.get(id(p), OTHER) for name, p in model.named_parameters() if p.requires_grad}


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm scales are not weight-decayed (Trainer's rule, decided by shape here)."""
    return param.ndim < 2 or name.endswith(".bias")


def component_param_groups(
    model: nn.Module, component_lr: Mapping[str, float] | None, lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per component present (and per decay setting), each with its learning rate.

    Components missing from ``component_lr`` train at ``lr``. Every group carries a ``"component"`` key so that
    schedulers, loggers and tests can tell them apart.
    """
    component_lr = dict(component_lr or {})
    # OTHER: trainable parameters outside every component (e.g. an lm_head in modules_to_save)
    check_known_components("component_lr", component_lr, extra=(OTHER,))
    owners = parameter_components(model)
    if not owners:
        raise ValueError("The model has no trainable parameters: wrap it with get_peft_model(...) first.")
    unused = sorted(set(component_lr) - set(owners.values()))
    if unused:
        warnings.warn(
            f"component_lr sets a learning rate for {unused}, but no trainable parameter belongs to them "
            f"(trainable components: {sorted(set(owners.values()))}). Check the finetune_* flags.",
            stacklevel=2,
        )
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if name not in owners:
            continue
        component, no_decay = owners[name], _no_decay(name, param)
        group = groups.setdefault(
            (component, no_decay),
            {
                "params": [],
                "lr": component_lr.get(component, lr),
                "weight_decay": 0.0 if no_decay else weight_decay,
                "component": component,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def create_optimizer(
    model: nn.Module,
    component_lr: Mapping[str, float] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters with per-component learning rates.

    Example: ``Trainer(model, args, optimizers=(create_optimizer(model, {"vision": 1e-4}, lr=5e-4), None))``.
    """
    groups = component_param_groups(model, component_lr, lr=lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


class ComponentLRMixin:
    """Adds ``component_lr=`` to a ``Trainer`` subclass: ``class MySFT(ComponentLRMixin, SFTTrainer): ...``.

    The optimizer class and its other settings still come from ``TrainingArguments`` (``optim``, ``adam_beta1``,
    ...); ``learning_rate`` is the rate of components not listed. ``supervised_loss=True`` (the default) computes
    training losses with :func:`supervised_loss`: logits only at trained tokens, the same loss and gradients.
    """

    def __init__(
        self,
        *args: Any,
        component_lr: Mapping[str, float] | None = None,
        supervised_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        self.component_lr = dict(component_lr) if component_lr else None
        self.use_supervised_loss = supervised_loss
        super().__init__(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.use_supervised_loss:
            loss = trainer_supervised_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if loss is not None:
                return loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the columns the chat collator reads (``images``, ``messages``) whatever ``remove_unused_columns``
        says: the model's forward does not take them, so the Trainer would drop them (or fail: "No columns in the
        dataset match")."""
        super()._set_signature_columns_if_needed()
        collator = getattr(self, "data_collator", None)
        wanted = [*COLLATOR_COLUMNS, *getattr(collator, "input_columns", ())]
        self._signature_columns += [column for column in wanted if column not in self._signature_columns]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.component_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        groups = component_param_groups(
            opt_model, self.component_lr, lr=self.args.learning_rate, weight_decay=self.args.weight_decay
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class VisionLoraTrainer(ComponentLRMixin, Trainer):
    """``transformers.Trainer`` with per-component learning rates (``component_lr=...``) and logits only at trained
    tokens (``supervised_loss=True``)."""


def _inputs_require_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the block's hidden states require grad, so reentrant checkpointing keeps its graph."""

    def wake(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
            return value.detach().requires_grad_(True)  # a fresh leaf: the caller's tensor is left as it was
        return value

    # Reentrant checkpointing only tracks positional inputs (transformers passes hidden states positionally).
    return ((wake(args[0]), *args[1:]), kwargs) if args else None


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> list[RemovableHandle]:
    """Turn on activation checkpointing so that every adapter, vision ones included, still gets its gradient.

    Call it after ``get_peft_model`` (it looks at which blocks hold trainable parameters). Non-reentrant
    checkpointing (the default, and transformers' default) needs nothing more. Reentrant checkpointing also gets a
    pre-hook on each checkpointed block that holds trainable parameters, making its input require grad; blocks
    before the first adapter stay hook-free, so a frozen vision tower costs no backward pass. Returns the hooks.
    """
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing.")
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers < 5.x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (base.config, base.config.get_text_config()):
        if hasattr(config, "use_cache"):
            config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    handles: list[RemovableHandle] = []
    if use_reentrant:
        for module in base.modules():
            checkpointed = isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
            if checkpointed and any(p.requires_grad for p in module.parameters()):
                handles.append(module.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True))
    return handles
