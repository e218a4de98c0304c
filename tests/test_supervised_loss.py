"""supervised_loss: the model's own loss and gradients, computing logits only where labels train.

Every comparison is against the model's own ``model(**batch).loss`` on the same weights: the loss to 1e-6 relative,
every adapter gradient with ``assert_close``'s fp32 tolerances.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import fresh_model, model_type_params, with_answers
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

import peft_vision_lora.integrations.loss as sl
from peft_vision_lora import VisionLoraConfig, supervised_loss
from peft_vision_lora.data import VisionChatCollator
from peft_vision_lora.integrations.training import VisionLoraTrainer
from peft_vision_lora.testing import SyntheticVLMDataset, build_processor
from peft_vision_lora.zoo.tiny import build_tiny_vlm, tiny_inputs

TEXT_ONLY_TYPES = ("qwen2_vl", "llava", "mllama")


def adapted(model_type: str, **config) -> torch.nn.Module:
    """A PeftModel whose every adapter gets a gradient (B != 0), in training mode."""
    config = {"r": 4, "init_lora_weights": False, **config}
    model = get_peft_model(fresh_model(model_type), VisionLoraConfig(**config))
    return model.train()


def loss_and_grads(model: torch.nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both runs (BLIP-2 trains with dropout on)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(ours: tuple, reference: tuple) -> None:
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize("model_type", model_type_params())
def test_loss_and_adapter_grads_equal_the_models_own(model_type):
    model = adapted(model_type, task="captioning")
    batch = with_answers(tiny_inputs(model, batch_size=3, seq_len=12), [5, 1, 9])
    reference = loss_and_grads(model, lambda: model(**batch).loss)
    result = sl.compute_supervised_loss(model, batch)
    assert_same(loss_and_grads(model, lambda: sl.compute_supervised_loss(model, batch).loss), reference)
    if model_type == "blip-2":
        assert result.fallback is not None and result.logits is None
    else:  # the kept logits are the 15 trained positions, not the 3 x (image + 12) of the whole batch
        assert result.fallback is None and result.logits.shape == (15, model.config.get_text_config().vocab_size)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "mllama", "kosmos-2"])
def test_gradient_accumulation_with_num_items_in_batch(model_type):
    """Two micro-batches, each a sum divided by the tokens of both (Trainer's num_items_in_batch)."""
    model = adapted(model_type, task="captioning")
    micro = [
        with_answers(tiny_inputs(model, batch_size=2, seq_len=10, seed=1), [3, 7]),
        with_answers(tiny_inputs(model, batch_size=2, seq_len=10, seed=2), [0, 2]),  # a row with nothing to train
    ]
    total = torch.tensor(12)

    def accumulate(loss_of):
        return sum(loss_of(batch) for batch in micro)

    reference = loss_and_grads(model, lambda: accumulate(lambda b: model(**b, num_items_in_batch=total).loss))
    ours = loss_and_grads(model, lambda: accumulate(lambda b: supervised_loss(model, b, num_items_in_batch=total)))
    assert_same(ours, reference)


@pytest.mark.parametrize("model_type", TEXT_ONLY_TYPES)
def test_text_only_batch(model_type):
    model = adapted(model_type, task="captioning")
    batch = with_answers(tiny_inputs(model, batch_size=2, seq_len=14, with_images=False), [4, 6])
    assert "pixel_values" not in batch
    reference = loss_and_grads(model, lambda: model(**batch).loss)
    assert_same(loss_and_grads(model, lambda: supervised_loss(model, batch)), reference)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
def test_collated_chat_batch_with_a_text_only_row(model_type):
    """Real labels from the chat collator (prompt, image and padding -100) on a batch mixing image and text rows."""
    base = build_tiny_vlm(model_type)
    dataset = SyntheticVLMDataset("captioning", size=16, seed=0, text_only_fraction=0.5)
    rows = [dataset[i] for i in range(len(dataset))]
    rows = [next(r for r in rows if not r["images"]), *[r for r in rows if r["images"]][:2]]
    batch = dict(VisionChatCollator(build_processor(base))(rows))
    model = get_peft_model(base, VisionLoraConfig(r=4, task="captioning", init_lora_weights=False)).train()
    trained = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert trained.min() > 0 and len(set(trained.tolist())) > 1  # every row trains, not all the same count
    reference = loss_and_grads(model, lambda: model(**batch).loss)
    assert_same(loss_and_grads(model, lambda: supervised_loss(model, batch)), reference)


def test_final_logit_softcapping_is_applied():
    """Gemma3 softcaps its logits in its forward: kept logits are capped too (a cap of 0.5 changes the loss a lot)."""
    model_type = "gemma3"
    capped = build_tiny_vlm(model_type, text_config={"final_logit_softcapping": 0.5})
    model = get_peft_model(capped, VisionLoraConfig(r=4, task="captioning", init_lora_weights=False)).train()
    batch = with_answers(tiny_inputs(model, batch_size=2, seq_len=10), [4, 2])
    reference = loss_and_grads(model, lambda: model(**batch).loss)
    assert abs(reference[0].item() - torch.log(torch.tensor(512.0)).item()) < 0.5  # logits within +-0.5
    assert_same(loss_and_grads(model, lambda: supervised_loss(model, batch)), reference)


def _text_lm(name: str, **extra):
    """A tiny text-only causal LM: families that scale their logits or add an MoE loss (no tiny VLM does)."""
    import transformers

    config = getattr(transformers, f"{name}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # no vision: plain LoRA
    model = get_peft_model(model, lora).train()
    input_ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, with_answers({"input_ids": input_ids, "labels": input_ids.clone()}, [5, 3])


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("Cohere", {"logit_scale": 3.0}),  # logits multiplied by logit_scale
        ("Granite", {"logits_scaling": 0.25}),  # logits divided by logits_scaling
        ("Mixtral", {"num_local_experts": 4, "output_router_logits": True, "router_aux_loss_coef": 0.5}),
    ],
    ids=["cohere-logit-scale", "granite-logits-scaling", "mixtral-aux-loss"],
)
def test_logit_scaling_and_moe_aux_loss_are_included(name, extra):
    model, batch = _text_lm(name, **extra)
    reference = loss_and_grads(model, lambda: model(**batch).loss)
    result = sl.compute_supervised_loss(model, batch)
    assert result.fallback is None
    if name == "Mixtral":
        assert result.outputs.aux_loss is not None and result.outputs.aux_loss.item() > 0
    assert_same(loss_and_grads(model, lambda: supervised_loss(model, batch)), reference)


def test_no_trained_token_gives_what_the_model_gives():
    model = adapted("llava", task="captioning")
    batch = with_answers(tiny_inputs(model, batch_size=2, seq_len=8), [0, 0])
    assert torch.isnan(model(**batch).loss) and torch.isnan(supervised_loss(model, batch))  # mean over no token
    loss = supervised_loss(model, batch, num_items_in_batch=5)  # a micro-batch of an accumulated step
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph: Trainer's backward does not fail
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_falls_back_to_the_models_own_loss_with_one_logged_line(caplog):
    import transformers

    model = adapted("blip-2", task="captioning")
    batch = with_answers(tiny_inputs(model, batch_size=2, seq_len=8), [3, 2])
    sl._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sl.__name__):
        supervised_loss(model, batch)
        torch.manual_seed(0)  # BLIP-2 trains with dropout: the same masks for the comparison
        ours = supervised_loss(model, batch)
    lines = [r.getMessage() for r in caplog.records if r.name == sl.__name__]
    assert len(lines) == 1 and "Blip2ForConditionalGeneration" in lines[0] and "logits_to_keep" in lines[0]
    torch.manual_seed(0)
    torch.testing.assert_close(ours, model(**batch).loss, rtol=0, atol=0)

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
        )
    ).eval()
    assert "encoder-decoder" in sl.fallback_reason(t5)
    ids = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(
        supervised_loss(t5, {"input_ids": ids, "labels": ids}), t5(input_ids=ids, labels=ids).loss
    )
    # BLIP (not BLIP-2) takes logits_to_keep, but its text decoder computes a label-smoothed loss of its own.
    blip = transformers.BlipConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    )
    assert "loss_function" in sl.fallback_reason(transformers.BlipForConditionalGeneration(blip))


# ---------------------------------------------------------------------------------------------------------------------
# Chunked cross-entropy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize(("rows", "vocab"), [(9, 341), (1, 17), (40, 512)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_chunked_cross_entropy_matches_torch(rows, vocab, chunk, dtype, tol):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    for num_items in (None, 2 * rows + 1):
        ours = sl.chunked_cross_entropy(logits, targets, num_items, chunk_size=chunk)
        (grad,) = torch.autograd.grad(ours, logits)
        reduction = "mean" if num_items is None else "sum"
        reference = torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)
        reference = reference if num_items is None else reference / num_items
        (ref_grad,) = torch.autograd.grad(reference, logits)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * 1e-2)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("chunk", [4, 16])
def test_at_most_chunk_times_vocab_float32_values_at_once(chunk):
    """fp16 logits of 64 trained tokens: forward and backward never hold a float32 tensor above chunk x vocab."""
    rows, vocab = 64, 300
    logits = torch.randn(rows, vocab).half().requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,))
    with _LargestFloat32() as mode:
        sl.chunked_cross_entropy(logits, targets, chunk_size=chunk).backward()
    assert chunk * vocab >= mode.largest >= chunk * vocab // 2, mode.largest
    with _LargestFloat32() as unchunked:  # what the model's own loss does: the whole float32 log-softmax
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    assert unchunked.largest == rows * vocab


def test_chunk_size_changes_nothing_on_a_model():
    model = adapted("qwen2_vl", task="captioning")
    batch = with_answers(tiny_inputs(model, batch_size=2, seq_len=16), [11, 6])
    reference = loss_and_grads(model, lambda: supervised_loss(model, batch))
    assert_same(loss_and_grads(model, lambda: supervised_loss(model, batch, chunk_size=3)), reference)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        supervised_loss(model, batch, chunk_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


def _train(tmp_path, switch: bool, calls: list, **extra) -> dict[str, torch.Tensor]:
    base = build_tiny_vlm("qwen2_vl")
    model = get_peft_model(base, VisionLoraConfig(r=4, task="captioning", finetune_projector=True))
    args = TrainingArguments(
        output_dir=str(tmp_path / str(switch)), max_steps=4, per_device_train_batch_size=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", save_strategy="no",
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = VisionLoraTrainer(
        model=model,
        args=args,
        train_dataset=SyntheticVLMDataset("captioning", size=24, seed=0, text_only_fraction=0.25),
        data_collator=VisionChatCollator(build_processor(base)),
        supervised_loss=switch,
        **extra,
    )
    trainer.train()
    calls.append(len([h for h in trainer.state.log_history if "loss" in h]))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_with_the_switch_on_and_off_ends_with_the_same_adapter(tmp_path, monkeypatch):
    used = []
    original = sl.compute_supervised_loss
    monkeypatch.setattr(sl, "compute_supervised_loss", lambda *a, **k: used.append(a[2]) or original(*a, **k))
    logged: list[int] = []
    on = _train(tmp_path, True, logged)
    assert len(used) == 8 and all(n is not None for n in used)  # 4 steps x 2 micro-batches, with num_items
    off = _train(tmp_path, False, logged)
    assert len(used) == 8 and logged == [4, 4]
    assert on.keys() == off.keys()
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = get_peft_model(build_tiny_vlm("qwen2_vl"), VisionLoraConfig(r=4, task="captioning"))
    assert any(not torch.equal(on[n], p) for n, p in initial.named_parameters() if n in on), "nothing trained"


def _train_trl(tmp_path, switch: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    trl = pytest.importorskip("trl")
    from peft_vision_lora.integrations.training import ComponentLRMixin

    class VisionLoraSFTTrainer(ComponentLRMixin, trl.SFTTrainer):
        pass

    base = build_tiny_vlm("qwen2_vl")
    processor = build_processor(base)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / str(switch)), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, disable_tqdm=True, seed=0, optim="sgd",
    )  # fmt: skip
    trainer = VisionLoraSFTTrainer(
        model=base,
        args=args,
        train_dataset=SyntheticVLMDataset("captioning", size=12, text_only_fraction=0.25).to_hf_dataset(),
        data_collator=VisionChatCollator(processor),
        processing_class=processor,
        peft_config=VisionLoraConfig(r=4, task="captioning"),
        supervised_loss=switch,
    )
    trainer.train()
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return adapter, [h for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_switch_on_and_off_train_the_same_and_log_the_same_metrics(tmp_path, monkeypatch):
    """TRL's own loss (its fused head) against ours: same adapter; entropy and token accuracy from kept logits."""
    used = []
    original = sl.compute_supervised_loss
    monkeypatch.setattr(sl, "compute_supervised_loss", lambda *a, **k: used.append(1) or original(*a, **k))
    on, logs_on = _train_trl(tmp_path, True)
    assert len(used) == 3
    off, logs_off = _train_trl(tmp_path, False)
    assert len(used) == 3 and len(logs_on) == len(logs_off) == 3
    # SGD, so that no update is amplified by Adam's normalisation. After 3 steps TRL's fused head and ours differ by
    # up to ~2e-6 on lora_B values of ~5e-4 (on a single batch both equal the model's own loss and gradients).
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-5, msg=name)
    for ours, theirs in zip(logs_on, logs_off):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
