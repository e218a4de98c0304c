"""Causal-LM loss computed only where labels train: logits and cross-entropy at answer tokens, none elsewhere.

In VLM fine-tuning most positions are image tokens and prompt, labelled -100, yet a model's own loss runs the output
head and a float32 log-softmax over the whole vocabulary at every position. :func:`supervised_loss` runs the model
without labels and asks for logits only at the positions whose *shifted* label trains (transformers'
``logits_to_keep``), so everything the model does to its logits (softcapping, scaling) still happens, on fewer rows.
The cross-entropy then runs in chunks of ``chunk_size`` rows, so at most ``chunk_size x vocabulary`` float32 values
are alive at once, in forward and in backward. The number is the model's own loss: same shift, ignore index and
reduction (mean over trained tokens, or sum / ``num_items_in_batch``), plus the MoE auxiliary loss when the model
adds one. Where that cannot be guaranteed it falls back to the model's own loss and logs the reason once.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import LOSS_MAPPING

from ..resolve.components import unwrap_model

__all__ = ["DEFAULT_CHUNK_SIZE", "IGNORE_INDEX", "SupervisedLossResult", "fallback_reason", "supervised_loss"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what transformers' ForCausalLMLoss ignores (no VLM forward passes another value)
# 1024 rows x Qwen's 151,936-token vocabulary = 0.62 GB of float32 per chunk: a long OCR answer stays under that,
# while a typical answer (tens to hundreds of tokens) is one chunk and pays no extra launches.
DEFAULT_CHUNK_SIZE = 1024

# Inputs that are loss arguments, not model inputs: the model call here never computes a loss.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")
_logged: set[tuple[str, str]] = set()


@dataclass
class SupervisedLossResult:
    """The loss, and what metrics need: logits and targets at the kept positions only (``None`` on fallback)."""

    loss: torch.Tensor
    logits: torch.Tensor | None  # (kept, vocab), in the model's dtype
    targets: torch.Tensor | None  # (kept,): every one trains
    outputs: Any  # the model's output object (its logits are the kept rows, or all of them on fallback)
    fallback: str | None  # why the model's own loss was used, or None


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(model).forward).parameters)


def _computes_causal_lm_loss(model: nn.Module) -> bool:
    """Whether ``model.loss_function`` is ``ForCausalLMLoss``, read without its "unrecognized loss_type" warning."""
    custom = getattr(model, "_loss_function", None)
    if custom is not None:
        return custom is LOSS_MAPPING["ForCausalLM"]
    loss_type = getattr(model, "loss_type", None)  # an unknown type falls back to ForCausalLM in transformers
    return LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"]) is LOSS_MAPPING["ForCausalLM"]


def _aux_loss_coef(model: nn.Module) -> float | None:
    """The weight the model gives its MoE load-balancing loss, from where transformers' forwards read it."""
    for owner, name in ((model, "router_aux_loss_coef"), (model, "aux_loss_coef")):
        if isinstance(getattr(owner, name, None), (int, float)):
            return float(getattr(owner, name))
    for config in (model.config.get_text_config(), model.config):
        if isinstance(getattr(config, "router_aux_loss_coef", None), (int, float)):
            return float(config.router_aux_loss_coef)
    return None


def _wants_router_logits(model: nn.Module, inputs: dict[str, Any]) -> bool:
    if "output_router_logits" in inputs:
        return bool(inputs["output_router_logits"])
    return any(getattr(c, "output_router_logits", False) for c in (model.config, model.config.get_text_config()))


@functools.cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # compiled or dynamically built forward
        return ""


def fallback_reason(model: nn.Module, inputs: dict[str, Any] | None = None) -> str | None:
    """Why :func:`supervised_loss` would use the model's own loss for ``model`` (a PeftModel or not), or None.

    The kept-logits path needs the forward that owns the output head to slice with transformers'
    ``slice_logits_to_keep`` (which takes a (batch, seq) bool mask) and to compute ``self.loss_function``, which
    must be ``ForCausalLMLoss``. Forwards that compute their own loss (BLIP's label smoothing, ...) fall back.
    """
    base = unwrap_model(model)
    if not isinstance(getattr(base, "config", None), PretrainedConfig):
        return f"{type(base).__name__} has no transformers config"
    if base.config.is_encoder_decoder:
        return "encoder-decoder models compute their loss in the decoder"
    if "logits_to_keep" not in _forward_params(base):
        return f"{type(base).__name__}.forward takes no logits_to_keep (BLIP-2: its loss offsets the query tokens)"
    heads = [m for m in base.modules() if hasattr(m, "lm_head")] or [base]
    for head in heads:
        source = _forward_source(type(head))
        if "slice_logits_to_keep(" not in source or "self.loss_function(" not in source:
            return f"{type(head).__name__}.forward does not slice its logits and compute self.loss_function"
        if not _computes_causal_lm_loss(head):
            return f"{type(head).__name__} computes a loss other than transformers' ForCausalLMLoss"
    if inputs is not None and "labels" not in inputs and "shift_labels" not in inputs:
        return "the batch has no labels"
    if inputs is not None and _wants_router_logits(base, inputs) and _aux_loss_coef(base) is None:
        return "its MoE auxiliary-loss weight was not found"
    return None


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_i CE(logits_i, target_i) / denominator`` with float32 log-sum-exp, ``chunk`` rows at a time.

    Forward keeps only the per-row log-sum-exp (one float per row); backward recomputes
    ``softmax(logits) - onehot(target)`` chunk by chunk. So at most ``chunk x vocab`` float32 values are alive at once,
    where autograd through ``F.cross_entropy`` would keep the whole float32 log-softmax until backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor, chunk: int):
        # logits: (N, V) in the model's dtype; targets: (N,) all trained; denominator: () float32
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, logits.shape[0], chunk):
            rows = logits[start : start + chunk].float()  # (c, V) float32: the only large temporary
            lse[start : start + chunk] = torch.logsumexp(rows, dim=1)
            picked = rows.gather(1, targets[start : start + chunk, None]).squeeze(1)  # (c,)
            total += (lse[start : start + chunk] - picked).sum()  # -log p(target) = lse - logit[target]
        ctx.save_for_backward(logits, targets, lse, denominator)
        ctx.chunk = chunk
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, lse, denominator = ctx.saved_tensors
        scale = grad_output / denominator  # d loss / d CE_i, the same for every row
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            probs = (logits[start:stop].float() - lse[start:stop, None]).exp_()  # (c, V) softmax
            index = targets[start:stop, None]  # (c, 1)
            probs.scatter_add_(1, index, probs.new_full(index.shape, -1.0))
            grad[start:stop] = probs.mul_(scale)  # d CE / d logits = softmax - onehot(target)
        return grad, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Cross-entropy of trained rows (no ignore index left), mean or sum / ``num_items_in_batch`` like transformers."""
    if num_items_in_batch is None:
        denominator = torch.tensor(float(targets.numel()), device=logits.device)  # 0 rows: 0 / 0 = nan, as torch
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=logits.device).float()
    return _ChunkedCrossEntropy.apply(logits, targets, denominator, chunk_size)


def _shifted_labels(inputs: dict[str, Any]) -> torch.Tensor:
    """Label of the token each position predicts: ``labels[:, 1:]`` padded with the ignore index (ForCausalLMLoss)."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    return F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]


def _log_once(base: nn.Module, reason: str) -> None:
    key = (type(base).__name__, reason)
    if key not in _logged:
        _logged.add(key)
        logger.warning("supervised_loss: using %s's own loss: %s.", type(base).__name__, reason)


def _own_loss(model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, reason: str) -> SupervisedLossResult:
    _log_once(unwrap_model(model), reason)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    outputs = model(**inputs, **extra)
    return SupervisedLossResult(outputs.loss, None, None, outputs, reason)


def compute_supervised_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SupervisedLossResult:
    """:func:`supervised_loss`, also returning the kept logits and targets (for token accuracy, entropy)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    base = unwrap_model(model)
    reason = fallback_reason(model, inputs)
    if reason is not None:
        return _own_loss(model, inputs, num_items_in_batch, reason)

    shift = _shifted_labels(inputs)  # (B, S)
    trained = shift != IGNORE_INDEX  # (B, S) bool: slice_logits_to_keep keeps these rows, flattened to (kept, H)
    model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
    if "use_cache" in _forward_params(base):
        model_inputs.setdefault("use_cache", False)  # the loss never reads the cache; training must not keep one
    outputs = model(**model_inputs, logits_to_keep=trained)

    logits, targets = outputs.logits, shift[trained]  # (kept, V), (kept,)
    if logits.shape[:-1] != targets.shape:
        shape = tuple(logits.shape)
        return _own_loss(model, inputs, num_items_in_batch, f"its logits_to_keep returned logits of shape {shape}")
    loss = chunked_cross_entropy(logits, targets.to(logits.device), num_items_in_batch, chunk_size)
    aux_loss = getattr(outputs, "aux_loss", None)
    if aux_loss is not None:
        loss = loss + _aux_loss_coef(base) * aux_loss.to(loss.device)  # what the model adds to its own loss
    outputs.loss = loss
    return SupervisedLossResult(loss, logits, targets, outputs, None)


def supervised_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The model's own causal-LM loss on ``inputs`` (a batch with ``labels``), computing logits only where it trains.

    ``num_items_in_batch``: under gradient accumulation, the number of trained tokens in the whole accumulated
    batch, as ``Trainer`` passes it; the loss is then a sum divided by it, else the mean over trained tokens.
    ``chunk_size``: rows of the vocabulary-wide float32 cross-entropy alive at once. Falls back to the model's own
    loss, logging the reason once, where it cannot reproduce it (see :func:`fallback_reason`).
    """
    return compute_supervised_loss(model, inputs, num_items_in_batch, chunk_size).loss


# --------------------------------------------------------------------------------------------------------------------
# Trainer integration: ComponentLRMixin.compute_loss calls this for training steps.
# --------------------------------------------------------------------------------------------------------------------


def _trainer_can_use(trainer: Any, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> bool:
    """Training steps whose loss is the model's own: no label smoothing, custom loss, sequence parallelism, TRL aux."""
    if return_outputs or not model.training or "labels" not in inputs:
        return False  # evaluation wants the full logits for compute_metrics
    if trainer.label_smoother is not None or trainer.compute_loss_func is not None:
        return False
    if getattr(trainer, "aux_loss_enabled", False):
        return False  # TRL weighs the MoE loss by its own rule: leave it to TRL's compute_loss
    if getattr(trainer.args, "loss_type", "nll") != "nll":
        return False  # TRL's DFT and other per-token reweightings
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return not (parallelism is not None and getattr(parallelism, "sp_enabled", False))


@torch.no_grad()
def _kept_metrics(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of entropy and of top-1 hits over the kept rows (TRL's ``entropy`` and ``mean_token_accuracy``)."""
    entropy = torch.zeros((), dtype=torch.float32, device=logits.device)
    correct = torch.zeros((), dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        rows = logits[start : start + chunk].float()  # (c, V)
        logp = rows.log_softmax(-1)
        entropy += -(logp.exp() * logp).sum()
        correct += (rows.argmax(-1) == targets[start : start + chunk]).sum()
    return entropy, correct


def _log_trl_metrics(trainer: Any, result: SupervisedLossResult, inputs: dict[str, Any], chunk: int) -> None:
    """The per-step metrics TRL's SFTTrainer logs, from the kept positions (all of them are the trained ones)."""
    if result.logits is None:
        return
    gather = trainer.accelerator.gather_for_metrics
    entropy, correct = _kept_metrics(result.logits.detach(), result.targets, chunk)
    count = gather(result.targets.new_tensor(result.targets.numel())).sum()
    entropy, correct = gather(entropy).sum(), gather(correct).sum()
    metrics = trainer._metrics["train"]
    metrics["entropy"].append((entropy / count).item() if count > 0 else 0.0)
    metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
    if "attention_mask" in inputs and hasattr(trainer, "_total_train_tokens"):
        tokens = gather(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens // getattr(trainer, "_tp_size", 1)
        metrics["num_tokens"] = [trainer._total_train_tokens]


def trainer_supervised_loss(
    trainer: Any,
    model: nn.Module,
    inputs: dict[str, Any],
    return_outputs: bool,
    num_items_in_batch: torch.Tensor | int | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor | None:
    """``Trainer.compute_loss`` for a training step, with logits at trained positions only; None: use Trainer's."""
    if not _trainer_can_use(trainer, model, inputs, return_outputs):
        return None
    reason = fallback_reason(model, inputs)
    if reason is not None:  # the trainer's own path (TRL's included) computes the model's loss and its metrics
        _log_once(unwrap_model(model), reason)
        return None
    # As Trainer: the model divides by num_items_in_batch only when it accepts loss kwargs.
    num_items = num_items_in_batch if trainer.model_accepts_loss_kwargs else None
    result = compute_supervised_loss(model, inputs, num_items, chunk_size)
    loss = result.loss
    if trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs and num_items is not None:
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, DDP averages the gradients.
        scale = trainer.accelerator.num_processes // trainer.get_tp_size()
        loss = loss * (scale if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)
    if isinstance(getattr(trainer, "_metrics", None), dict) and "train" in trainer._metrics:
        _log_trl_metrics(trainer, result, inputs, chunk_size)
    return loss
