"""supervised_loss: every fallback with its exact logged reason, the kept-logits path's inputs, and the chunking.

Each fallback must give the model's own loss (``num_items_in_batch`` included) and log one exact line naming the
class and the reason; the kept-logits path must match the model's own loss whatever it is fed (``shift_labels``,
cache settings, a head inside a wrapper, an MoE weight read from the model or from its config).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers
from helpers import fresh_model, with_answers
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import CausalLMOutput

import peft_vision_lora.integrations.loss as sl
from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.zoo.tiny import tiny_inputs


def adapted(model_type: str) -> nn.Module:
    return get_peft_model(fresh_model(model_type), VisionLoraConfig(r=4, task="captioning", init_lora_weights=False))


def batch_for(model: nn.Module, trained=(5, 3), seq_len: int = 10, **kwargs) -> dict:
    return with_answers(tiny_inputs(model, batch_size=len(trained), seq_len=seq_len, **kwargs), list(trained))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == sl.__name__]


class _CountOps(TorchDispatchMode):
    """Counts the calls of each aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------------
# Fallbacks: the model's own loss, one exact logged line
# ---------------------------------------------------------------------------------------------------------------------


class _ToyLM(nn.Module):
    """A causal LM without a transformers config: an embedding and a head, its own shifted cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(32, 16), nn.Linear(16, 32)

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        return CausalLMOutput(loss=loss / (num_items_in_batch or (labels[:, 1:] != -100).sum()), logits=logits)


def _t5():
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).train()


def _bart_causal_lm():
    """BartForCausalLM slices with logits_to_keep but computes an unshifted loss of its own (no loss_function)."""
    config = transformers.BartConfig(
        vocab_size=64, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BartForCausalLM(config).train()


def _ids(vocab: int = 32) -> dict:
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return with_answers({"input_ids": ids}, [4, 2])


def _masked_lm_qwen():
    model = adapted("qwen2_vl")
    model.base_model.model.loss_type = "ForMaskedLM"  # an unshifted loss: the number differs from ForCausalLM's
    return model


def _kosmos_with_a_custom_inner_loss():
    model = adapted("kosmos-2")
    causal = LOSS_MAPPING["ForCausalLM"]
    model.base_model.model.text_model.loss_function = lambda *a, **k: 2 * causal(*a, **k)
    return model


@pytest.mark.parametrize(
    ("build", "inputs", "name", "reason"),
    [
        (_ToyLM, lambda m: _ids(), "_ToyLM", "_ToyLM has no transformers config"),
        (
            _t5, lambda m: _ids(64), "T5ForConditionalGeneration",
            "encoder-decoder models compute their loss in the decoder",
        ),
        (
            lambda: adapted("blip-2"), batch_for, "Blip2ForConditionalGeneration",
            "Blip2ForConditionalGeneration.forward takes no logits_to_keep"
            " (BLIP-2: its loss offsets the query tokens)",
        ),
        (
            _bart_causal_lm, lambda m: _ids(64), "BartForCausalLM",
            "BartForCausalLM.forward does not slice its logits and compute self.loss_function",
        ),
        (
            _masked_lm_qwen, batch_for, "Qwen2VLForConditionalGeneration",
            "Qwen2VLForConditionalGeneration computes a loss other than transformers' ForCausalLMLoss",
        ),
        (
            _kosmos_with_a_custom_inner_loss, batch_for, "Kosmos2ForConditionalGeneration",
            "Kosmos2TextForCausalLM computes a loss other than transformers' ForCausalLMLoss",
        ),
    ],
    ids=["no-config", "encoder-decoder", "no-logits-to-keep", "no-loss-function", "masked-lm", "inner-head-loss"],
)  # fmt: skip
def test_each_fallback_gives_the_models_own_loss_and_logs_its_reason_once(build, inputs, name, reason, caplog):
    model = build()
    batch = inputs(model)
    assert sl.fallback_reason(model) == reason and sl.fallback_reason(model, batch) == reason
    sl._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        for num_items in (None, 11):  # 11: not the batch's own count of trained tokens
            torch.manual_seed(0)  # BLIP-2 trains with dropout: the same masks in both runs
            result = sl.compute_supervised_loss(model, batch, num_items_in_batch=num_items)
            torch.manual_seed(0)
            extra = {} if num_items is None else {"num_items_in_batch": num_items}
            own = model(**batch, **extra)
            torch.testing.assert_close(result.loss, own.loss, rtol=0, atol=0)
            torch.testing.assert_close(result.outputs.logits, own.logits, rtol=0, atol=0)
            assert result.fallback == reason and result.logits is None and result.targets is None
            assert result.outputs.loss is result.loss
    assert warnings_of(caplog) == [f"supervised_loss: using {name}'s own loss: {reason}."]


def test_num_items_in_batch_reaches_the_models_own_loss_on_fallback():
    """The masked-LM fallback divides a sum by ``num_items_in_batch``: 11 and None give different numbers."""
    model = _masked_lm_qwen()
    batch = batch_for(model)
    mean = sl.supervised_loss(model, batch)
    summed = sl.supervised_loss(model, batch, num_items_in_batch=11)
    trained = (batch["labels"] != -100).sum()
    torch.testing.assert_close(summed, mean * trained / 11)


def test_a_batch_without_labels_falls_back_with_one_line_per_model_class(caplog):
    sl._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        for model_type in ("qwen2_vl", "llava", "qwen2_vl"):
            model = adapted(model_type)
            batch = {k: v for k, v in batch_for(model).items() if k != "labels"}
            result = sl.compute_supervised_loss(model, batch)
            assert result.fallback == "the batch has no labels" and result.loss is None
            assert result.outputs.logits.shape[:2] == batch["input_ids"].shape
    assert warnings_of(caplog) == [
        "supervised_loss: using Qwen2VLForConditionalGeneration's own loss: the batch has no labels.",
        "supervised_loss: using LlavaForConditionalGeneration's own loss: the batch has no labels.",
    ]


def test_two_reasons_for_one_class_are_both_logged(caplog):
    sl._logged.clear()
    model = adapted("qwen2_vl")
    batch = batch_for(model)
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        sl.compute_supervised_loss(model, {k: v for k, v in batch.items() if k != "labels"})
        model.base_model.model.loss_type = "ForMaskedLM"
        sl.compute_supervised_loss(model, batch)
    assert len(warnings_of(caplog)) == 2


def test_logits_not_sliced_to_the_trained_rows_fall_back_with_their_shape(caplog):
    """A forward that ignores the mask (a wrapper passing ``logits_to_keep=0``) returns every position's logits."""
    model = adapted("llava")
    base = model.base_model.model
    original = base.forward
    base.forward = lambda *a, logits_to_keep=0, **k: original(*a, **k)
    batch = batch_for(model, trained=(1, 1))  # 2 trained rows: as many as the batch has rows
    sl._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        result = sl.compute_supervised_loss(model, batch, num_items_in_batch=7)
    shape = (2, batch["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    reason = f"its logits_to_keep returned logits of shape {shape}"
    assert result.fallback == reason and result.logits is None
    assert warnings_of(caplog) == [f"supervised_loss: using LlavaForConditionalGeneration's own loss: {reason}."]
    torch.testing.assert_close(result.loss, model(**batch, num_items_in_batch=7).loss, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Kept-logits path: what decides it, and what it feeds the model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen2_vl", "kosmos-2"])  # kosmos-2: the head is an inner module
def test_supported_models_need_no_fallback_with_or_without_a_batch(model_type):
    model = adapted(model_type)
    assert sl.fallback_reason(model) is None and sl.fallback_reason(model, batch_for(model)) is None
    result = sl.compute_supervised_loss(model, batch_for(model))
    assert result.fallback is None and result.logits.shape[0] == 8


@pytest.mark.parametrize(
    "configure",
    [
        lambda m: setattr(m, "loss_type", "NoSuchLoss"),  # transformers falls back to ForCausalLM
        lambda m: setattr(m, "loss_function", LOSS_MAPPING["ForCausalLM"]),  # set explicitly
    ],
    ids=["unknown-loss-type", "explicit-causal-lm-loss"],
)
def test_a_causal_lm_loss_however_configured_takes_the_kept_logits_path(configure):
    model = adapted("qwen2_vl")
    configure(model.base_model.model)
    batch = batch_for(model)
    result = sl.compute_supervised_loss(model, batch)
    assert result.fallback is None and result.logits.shape[0] == 8
    torch.testing.assert_close(result.loss, model(**batch).loss, rtol=1e-6, atol=0)


def test_shift_labels_are_the_targets_when_given():
    """``shift_labels`` alone, or beside ``labels`` (ForCausalLMLoss then reads only ``shift_labels``)."""
    model = adapted("qwen2_vl")
    batch = batch_for(model, trained=(6, 4))
    shift = nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    only = {**{k: v for k, v in batch.items() if k != "labels"}, "shift_labels": shift}
    result = sl.compute_supervised_loss(model, only)
    assert result.fallback is None and result.targets.numel() == 10
    torch.testing.assert_close(result.loss, model(**batch).loss, rtol=1e-6, atol=0)
    fewer = shift.clone()
    fewer[:, -3:] = -100  # trains fewer tokens than labels do
    both = {**batch, "shift_labels": fewer}
    result = sl.compute_supervised_loss(model, both)
    assert result.targets.numel() == (fewer != -100).sum() < 10
    torch.testing.assert_close(result.loss, model(**both).loss, rtol=1e-6, atol=0)


def test_no_cache_is_built_unless_asked():
    model = adapted("qwen2_vl")
    batch = batch_for(model)
    assert (
        model.config.get_text_config().use_cache and model(**batch).past_key_values is not None
    )  # what the model does by itself
    assert sl.compute_supervised_loss(model, batch).outputs.past_key_values is None
    assert sl.compute_supervised_loss(model, {**batch, "use_cache": True}).outputs.past_key_values is not None


def test_outputs_carry_the_loss_and_the_kept_rows():
    model = adapted("qwen2_vl")
    result = sl.compute_supervised_loss(model, batch_for(model))
    assert result.outputs.loss is result.loss and result.outputs.logits is result.logits


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_the_loss_runs_in_chunks_of_chunk_size_rows(chunk):
    """8 trained rows: ceil(8 / chunk) log-sum-exps forward, as many softmaxes backward, the same loss."""
    model = adapted("qwen2_vl")
    batch = batch_for(model)
    with _CountOps() as ops:
        loss = sl.supervised_loss(model, batch, chunk_size=chunk)
        loss.backward()
    assert ops.counts["logsumexp"] == ops.counts["exp_"] == math.ceil(8 / chunk)
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# MoE auxiliary loss: its weight from the model, an older attribute name, or the config
# ---------------------------------------------------------------------------------------------------------------------


def _moe_lm(name: str, targets=("q_proj", "v_proj"), **extra):
    config = getattr(transformers, f"{name}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, output_router_logits=True, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    return get_peft_model(model, LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False)).train()


def _qwen3_vl_moe():
    """A VLM whose forward reads the weight from its text config (the model has no attribute for it)."""
    text = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
        "num_experts_per_tok": 2, "output_router_logits": True, "router_aux_loss_coef": 0.3,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    }  # fmt: skip
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32}
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    )
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).train()


def _text_batch(vocab: int = 64) -> dict:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    return with_answers({"input_ids": ids}, [5, 3])


@pytest.mark.parametrize(
    "build",
    [
        # The forward reads model.router_aux_loss_coef, here not the config's value.
        lambda: _moe_lm("Mixtral", num_local_experts=4, router_aux_loss_coef=0.5),
        lambda: _moe_lm("JetMoe", ["kv_proj"], num_local_experts=4, aux_loss_coef=0.7),  # model.aux_loss_coef
        _qwen3_vl_moe,
    ],
    ids=["mixtral-model-attribute", "jetmoe-aux-loss-coef", "qwen3-vl-moe-text-config"],
)
def test_moe_aux_loss_weight_is_the_one_the_forward_uses(build):
    model = build()
    base = model.base_model.model
    if hasattr(base, "router_aux_loss_coef"):
        base.router_aux_loss_coef = 0.125
    batch = _text_batch()
    result = sl.compute_supervised_loss(model, batch)
    assert result.fallback is None and result.outputs.aux_loss.item() > 0
    torch.testing.assert_close(result.loss, model(**batch).loss, rtol=1e-6, atol=0)


def test_moe_without_a_weight_falls_back_only_when_router_logits_are_asked():
    model = _qwen3_vl_moe()
    # As a model keeping its weight where supervised_loss does not look (bypassing the config's type check).
    vars(model.base_model.model.config.text_config)["router_aux_loss_coef"] = None
    batch = _text_batch()
    reason = "its MoE auxiliary-loss weight was not found"
    assert sl.fallback_reason(model) is None  # no batch: no router logits asked for
    assert sl.fallback_reason(model, batch) == reason  # the config asks for them
    assert sl.fallback_reason(model, {**batch, "output_router_logits": True}) == reason
    off = {**batch, "output_router_logits": False}
    assert sl.fallback_reason(model, off) is None  # the batch overrides the config
    model.base_model.model.config.text_config.output_router_logits = False
    assert sl.fallback_reason(model, batch) is None
    result = sl.compute_supervised_loss(model, off)
    assert result.fallback is None
    torch.testing.assert_close(result.loss, model(**off).loss, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked cross-entropy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_more_rows_than_vocabulary(chunk):
    """50 rows over a 7-token vocabulary: every row counts, in forward and in backward."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 7, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 7, (50,), generator=gen)
    ours = sl.chunked_cross_entropy(logits, targets, chunk_size=chunk)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = nn.functional.cross_entropy(logits, targets)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk", [3, 16])
def test_each_row_is_read_once_forward_and_backward(chunk):
    logits = torch.randn(16, 11).requires_grad_(True)
    with _CountOps() as ops:
        sl.chunked_cross_entropy(logits, torch.randint(0, 11, (16,)), chunk_size=chunk).backward()
    assert ops.counts["logsumexp"] == ops.counts["exp_"] == math.ceil(16 / chunk)


def test_float16_logits_accumulate_in_float32():
    """A float16 sum over 300 rows would lose digits: the loss is float32 and matches torch's float32 loss."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 50, generator=gen) * 4).half()
    targets = torch.randint(0, 50, (300,), generator=gen)
    for num_items in (None, 1000):
        ours = sl.chunked_cross_entropy(logits, targets, num_items, chunk_size=7)
        reference = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / (num_items or 300)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer: which steps take the kept-logits path, and the same loss as Trainer's own either way
# ---------------------------------------------------------------------------------------------------------------------


def _trainer(model: nn.Module, **args) -> transformers.Trainer:
    from peft_vision_lora.integrations.training import VisionLoraTrainer

    trainer_kwargs = {k: args.pop(k) for k in ("compute_loss_func",) if k in args}
    args = transformers.TrainingArguments(
        output_dir="unused", report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False, **args
    )
    return VisionLoraTrainer(model=model, args=args, **trainer_kwargs)


def on_and_off(trainer, batch: dict, return_outputs: bool = False, num_items=None) -> tuple[list, list[bool]]:
    """``trainer.compute_loss`` with the switch on, then off; and whether each forward got ``logits_to_keep``."""
    kept: list[bool] = []
    base = trainer.model.base_model.model
    hook = base.register_forward_pre_hook(lambda m, a, k: kept.append("logits_to_keep" in k), with_kwargs=True)
    losses = []
    for switch in (True, False):
        trainer.use_supervised_loss = switch
        torch.manual_seed(0)
        out = trainer.compute_loss(trainer.model, dict(batch), return_outputs, num_items)
        losses.append(out[0] if return_outputs else out)
    hook.remove()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    return losses, kept


def _sequence_parallel(size: int):
    """A setup giving the trainer's accelerator a parallelism config with ``size`` sequence-parallel ranks."""
    from accelerate.parallelism_config import ParallelismConfig

    config = ParallelismConfig(sp_size=size, sp_backend="deepspeed") if size > 1 else ParallelismConfig()

    def setup(trainer, monkeypatch):
        monkeypatch.setattr(type(trainer.accelerator), "parallelism_config", property(lambda self: config))

    return setup


def _doubled_loss(outputs, labels, num_items_in_batch=None):
    return 2 * LOSS_MAPPING["ForCausalLM"](
        outputs.logits, labels, outputs.logits.shape[-1], num_items_in_batch=num_items_in_batch
    )


@pytest.mark.parametrize(
    ("args", "setup"),
    [
        ({}, lambda t, _: t.model.eval()),  # evaluation: compute_metrics wants the full logits
        ({"label_smoothing_factor": 0.1}, None),
        ({"compute_loss_func": _doubled_loss}, None),
        ({}, lambda t, _: setattr(t, "aux_loss_enabled", True)),  # TRL weighs the MoE loss itself
        ({}, lambda t, _: setattr(t.args, "loss_type", "dft")),  # TRL's per-token reweighting
        ({}, _sequence_parallel(2)),
    ],
    ids=["eval", "label-smoother", "compute-loss-func", "trl-aux-loss", "trl-dft", "sequence-parallel"],
)
def test_steps_whose_loss_is_not_the_models_own_use_trainers_path(args, setup, monkeypatch):
    model = adapted("qwen2_vl").train()
    trainer = _trainer(model, **args)
    if setup is not None:
        setup(trainer, monkeypatch)
    for num_items in (None, 11):
        assert sl.trainer_supervised_loss(trainer, model, batch_for(model), False, num_items) is None
        if trainer.accelerator.parallelism_config is None:  # Trainer's sequence-parallel loss needs DeepSpeed
            _, kept = on_and_off(trainer, batch_for(model), num_items=num_items)
            assert kept == [False, False]


def test_return_outputs_uses_trainers_path_with_the_full_logits():
    model = adapted("qwen2_vl").train()
    trainer = _trainer(model)
    batch = batch_for(model)
    _, kept = on_and_off(trainer, batch, return_outputs=True)
    assert kept == [False, False]
    _, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape


def test_a_batch_with_shift_labels_but_no_labels_is_left_to_the_trainer():
    model = adapted("qwen2_vl").train()
    trainer = _trainer(model)
    batch = batch_for(model)
    batch["shift_labels"] = nn.functional.pad(batch.pop("labels"), (0, 1), value=-100)[..., 1:]
    with pytest.raises(ValueError, match="did not return a loss"):  # Trainer's own message: the model computed none
        trainer.compute_loss(model, batch)


@pytest.mark.parametrize(
    ("args", "setup"),
    [
        ({}, None),
        ({}, _sequence_parallel(1)),  # configured, no SP
        ({}, lambda t, _: setattr(t, "model_accepts_loss_kwargs", False)),  # Trainer then takes the mean
        ({"average_tokens_across_devices": False}, None),
    ],
    ids=["default", "no-sequence-parallel", "no-loss-kwargs", "no-token-averaging"],
)
@pytest.mark.parametrize(("processes", "tp", "n_gpu"), [(1, 1, 0), (3, 2, 0), (3, 1, 2), (3, 1, 1)])
def test_training_steps_take_the_kept_logits_path_with_trainers_scaling(
    args, setup, processes, tp, n_gpu, monkeypatch
):
    """As ``Trainer.compute_loss``: sum / num_items_in_batch, times the data-parallel ranks (or DataParallel GPUs)."""
    model = adapted("qwen2_vl").train()
    trainer = _trainer(model, **args)
    if setup is not None:
        setup(trainer, monkeypatch)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
    monkeypatch.setattr(trainer, "get_tp_size", lambda: tp)
    monkeypatch.setattr(trainer.args, "_n_gpu", n_gpu)
    for num_items in (None, 11):
        _, kept = on_and_off(trainer, batch_for(model), num_items=num_items)
        assert kept == [True, False]


def test_a_model_that_falls_back_is_left_to_the_trainer_with_one_logged_line(caplog):
    model = _masked_lm_qwen().train()
    trainer = _trainer(model)
    sl._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        _, kept = on_and_off(trainer, batch_for(model), num_items=11)
        on_and_off(trainer, batch_for(model))
    assert kept == [False, False]
    reason = "Qwen2VLForConditionalGeneration computes a loss other than transformers' ForCausalLMLoss"
    assert warnings_of(caplog) == [f"supervised_loss: using Qwen2VLForConditionalGeneration's own loss: {reason}."]


def test_the_trainer_path_runs_in_chunks_of_chunk_size_rows():
    model = adapted("qwen2_vl").train()
    trainer = _trainer(model)
    with _CountOps() as ops:
        sl.trainer_supervised_loss(trainer, model, batch_for(model), False, None, chunk_size=3)
    assert ops.counts["logsumexp"] == 3  # 8 trained rows


# ---------------------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer: the metrics it logs, from the kept rows
# ---------------------------------------------------------------------------------------------------------------------


def _sft_trainer(tmp_path, **config):
    trl = pytest.importorskip("trl")
    from peft_vision_lora.integrations.training import ComponentLRMixin
    from peft_vision_lora.testing import SyntheticVLMDataset, build_processor

    class VisionLoraSFTTrainer(ComponentLRMixin, trl.SFTTrainer):
        pass

    base = fresh_model("qwen2_vl")
    args = trl.SFTConfig(
        output_dir=str(tmp_path), report_to="none", save_strategy="no", remove_unused_columns=False, use_cpu=True,
        dataset_kwargs={"skip_prepare_dataset": True}, **config,
    )  # fmt: skip
    trainer = VisionLoraSFTTrainer(
        model=base,
        args=args,
        train_dataset=SyntheticVLMDataset("captioning", size=2).to_hf_dataset(),
        processing_class=build_processor(base),
        peft_config=VisionLoraConfig(r=4, task="captioning", init_lora_weights=False),
    )
    trainer.model.train()
    return trainer


def _half_predicted(model, batch: dict) -> dict:
    """Every other trained target replaced by the model's own top-1 prediction: an accuracy strictly inside (0, 1)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"].clone()
    for i, (row, col) in enumerate((labels[:, 1:] != -100).nonzero().tolist()):
        if i % 2 == 0:
            labels[row, col + 1] = logits[row, col].argmax()
    return {**batch, "labels": labels}


@pytest.mark.parametrize(("trained", "tp_size"), [((6, 3), 1), ((6, 3), 2), ((1, 0), 1), ((0, 0), 1)])
def test_trl_metrics_are_trls_own_and_the_full_logits(trained, tp_size, tmp_path):
    trainer = _sft_trainer(tmp_path)
    model = trainer.model
    trainer._tp_size = tp_size
    batch = _half_predicted(model, batch_for(model, trained))
    count = sum(trained)
    logged = []
    for switch in (True, False):
        trainer.use_supervised_loss = switch
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 5
        trainer.compute_loss(model, dict(batch), num_items_in_batch=max(count, 1))
        logged.append({k: v for k, v in trainer._metrics["train"].items()})
    ours, trls = logged
    assert ours.keys() == trls.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    for key in ours:
        assert ours[key] == pytest.approx(trls[key], rel=1e-5), key
    # Independently, from the full logits at the positions whose shifted label trains.
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)[mask]
    hits = (logits.argmax(-1) == targets)[mask].float()
    assert ours["entropy"] == [pytest.approx(entropy.mean().item() if count else 0.0, rel=1e-5)]
    assert ours["mean_token_accuracy"] == [pytest.approx(hits.mean().item() if count else 0.0)]
    if count > 1:
        assert 0 < ours["mean_token_accuracy"][0] < 1
    tokens = 5 + batch["attention_mask"].sum().item() // tp_size
    assert ours["num_tokens"] == [tokens] and type(ours["num_tokens"][0]) is int


def test_trl_dft_loss_is_left_to_trl(tmp_path):
    trainer = _sft_trainer(tmp_path, loss_type="dft")
    batch = batch_for(trainer.model)
    assert sl.trainer_supervised_loss(trainer, trainer.model, batch, False, None) is None
    _, kept = on_and_off(trainer, batch, num_items=8)
    assert kept == [False, False]


class _ToyLMWithoutLossKwargs(_ToyLM):
    def forward(self, input_ids, labels=None):
        return super().forward(input_ids, labels)


def test_fallback_passes_no_num_items_to_a_forward_that_takes_none():
    model = _ToyLMWithoutLossKwargs()
    batch = _ids()
    torch.testing.assert_close(sl.supervised_loss(model, batch), model(**batch).loss, rtol=0, atol=0)
