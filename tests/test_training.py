"""Training a tiny VLM end to end: Trainer and TRL, component learning rates, gradient checkpointing, checkpoints.

The runs go through ``examples/finetune_vlm.py`` (the code users copy) on the synthetic tasks.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import get_peft_model
from safetensors.torch import load_file

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.integrations.training import (
    VisionLoraTrainer,
    component_param_groups,
    create_optimizer,
    enable_gradient_checkpointing,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    """Import ``examples/<name>.py`` (examples are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


finetune_vlm = load_example("finetune_vlm")


def run_example(output_dir, *extra: str):
    argv = ["--model-type", "qwen2_vl", "--output-dir", str(output_dir), "--no-progress", "--eval-size", "0"]
    return finetune_vlm.finetune(finetune_vlm.build_parser().parse_args(argv + list(extra)))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def component_from_name(name: str) -> str:
    """Hand-written ground truth for qwen2_vl: where each component's parameters live."""
    if ".visual.merger." in name:
        return "projector"
    if ".visual." in name:
        return "vision"
    if ".language_model." in name:
        return "language"
    raise AssertionError(f"unexpected trainable parameter {name}")


@torch.no_grad()
def loss_on(model, collator, dataset) -> float:
    """Mean loss over ``dataset`` in fixed batches of 8: free of the batch-to-batch noise of training logs."""
    model.eval()
    batches = [collator([dataset[i] for i in range(s, min(s + 8, len(dataset)))]) for s in range(0, len(dataset), 8)]
    return mean(model(**batch).loss.item() for batch in batches)


@pytest.mark.parametrize("strategy", ["vision+language", "language", "vision"])
def test_loss_decreases_on_synthetic_captioning_for_each_strategy(tmp_path, strategy):
    """A few dozen Trainer steps lower the captioning loss with every strategy. Vision-only moves it least: the
    frozen language model can only be steered through the image tokens."""
    result = run_example(
        tmp_path, "--task", "captioning", "--strategy", strategy, "--finetune-projector", "false",
        "--steps", "30", "--train-size", "48", "--batch-size", "8",
    )  # fmt: skip
    expected = {"vision+language": {"vision", "language"}, "language": {"language"}, "vision": {"vision"}}[strategy]
    assert set(result.per_component) == expected
    logged = [loss for _, loss in result.losses]
    assert len(logged) == 30 and mean(logged[-5:]) < mean(logged[:5])
    train = finetune_vlm.SyntheticVLMDataset("captioning", size=48, seed=0)  # what the run trained on
    before = loss_on(finetune_vlm.build_base("qwen2_vl"), result.collator, train)  # LoRA B starts at 0: same model
    after = loss_on(result.model, result.collator, train)
    assert after < before - (0.1 if strategy == "vision" else 2.0), (before, after)


def test_component_learning_rates_land_on_their_parameters():
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task="captioning", finetune_projector=True))
    rates = {"vision": 1e-3, "projector": 1e-2, "language": 1e-1}
    optimizer = create_optimizer(model, rates, lr=5.0, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each exactly once
    for group in optimizer.param_groups:
        assert group["lr"] == rates[group["component"]]
        assert {component_from_name(names[id(p)]) for p in group["params"]} == {group["component"]}

    # One AdamW step moves each weight by about its group's lr (|g| / (|g| + eps) ~ 1): the rates really apply.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    model(**inputs_for("qwen2_vl")).loss.backward()
    optimizer.step()
    for component, lr in rates.items():
        moved = max(
            (p.detach() - before[n]).abs().max().item()
            for n, p in model.named_parameters()
            if n in before and component_from_name(n) == component
        )
        assert moved == pytest.approx(lr, rel=1e-2), component


def test_component_lr_errors_and_warnings():
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task="vqa"))
    with pytest.raises(ValueError, match="Unknown component"):
        component_param_groups(model, {"visoin": 1e-4}, lr=1e-3)
    with pytest.warns(UserWarning, match=r"no trainable parameter belongs to them"):
        groups = component_param_groups(model, {"vision": 1e-4}, lr=1e-3)
    assert {g["component"] for g in groups} == {"language"}


def test_trainer_builds_component_groups_from_training_arguments(tmp_path):
    model = get_peft_model(
        fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task="captioning", finetune_projector="full")
    )
    args = finetune_vlm.training_arguments(
        finetune_vlm.build_parser().parse_args(["--output-dir", str(tmp_path), "--lr", "3e-3", "--no-progress"])
    )
    trainer = VisionLoraTrainer(model=model, args=args, component_lr={"vision": 1e-4})
    optimizer = trainer.create_optimizer()
    by_component = {(g["component"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert by_component[("vision", 0.0)] == 1e-4 and by_component[("language", 0.0)] == 3e-3
    assert ("projector", 0.0) in by_component  # the fully trained projector's biases
    assert type(optimizer).__name__ == "AdamW"  # TrainingArguments.optim still picks the class


def _grads(model_type: str, task: str, checkpointing: str | None, only_language_hook: bool = False):
    torch.manual_seed(0)
    config = VisionLoraConfig(r=4, task=task, init_lora_weights=False)  # B != 0: every adapter gets a gradient
    model = get_peft_model(fresh_model(model_type), config)
    model.train()
    base = model.get_base_model()
    if checkpointing == "ours":
        enable_gradient_checkpointing(model, use_reentrant=True)
    elif checkpointing is not None:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing == "re"})
    if only_language_hook:  # what tools that hook only the language model's embeddings leave behind
        base.disable_input_require_grads()
        base.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model(**inputs_for(model_type)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("task", ["captioning", "vqa"], ids=["vision-lora", "frozen-vision"])
def test_gradient_checkpointing_gives_the_same_gradients(task, use_reentrant):
    reference = _grads("qwen2_vl", task, None)
    torch.manual_seed(0)
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task=task, init_lora_weights=False))
    model.train()
    enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    assert model.get_base_model().is_activation_checkpointing
    model(**inputs_for("qwen2_vl")).loss.backward()
    checkpointed = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert checkpointed.keys() == reference.keys()
    vision = [n for n in reference if ".visual." in n]
    assert bool(vision) == (task == "captioning")
    for name in vision:
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_keeps_vision_gradients_when_only_the_language_model_is_hooked():
    reference = _grads("qwen2_vl", "captioning", None)
    vision = [n for n in reference if ".visual." in n]
    broken = _grads("qwen2_vl", "captioning", "re", only_language_hook=True)
    assert all(broken[n] is None for n in vision), "the failure this guards against did not reproduce"
    fixed = _grads("qwen2_vl", "captioning", "ours", only_language_hook=True)
    for name in reference:
        torch.testing.assert_close(fixed[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoints_hold_only_the_adapter_and_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["--steps", "6", "--batch-size", "4", "--train-size", "32", "--finetune-projector", "full"]
    common += ["--lora-dropout", "0.1", "--text-only-fraction", "0.25"]  # dropout: the RNG state must resume too
    common += ["--save-steps", "3"]
    full = run_example(tmp_path / "full", *common)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == full.trainable  # what was trained, nothing of the frozen base
    projector = {k for k in saved if ".merger." in k}
    assert projector and all("lora_" not in k for k in projector)  # trained fully, saved as plain weights
    assert all("lora_" in k or ".merger." in k for k in saved)

    resumed = run_example(tmp_path / "resumed", *common, "--resume-from-checkpoint", str(checkpoint))
    assert [step for step, _ in resumed.losses] == [4, 5, 6]
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in full.losses[3:]], rel=1e-6)
    final_full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert final_full.keys() == final_resumed.keys() == saved.keys()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-7, msg=key)
    assert any(not torch.equal(final_full[k], saved[k]) for k in saved), "the last 3 steps changed nothing"


def test_trl_sft_trainer_trains_a_vision_lora_config(tmp_path):
    trl = pytest.importorskip("trl")
    from peft_vision_lora.data import VisionChatCollator
    from peft_vision_lora.integrations.training import ComponentLRMixin
    from peft_vision_lora.testing import SyntheticVLMDataset, build_processor

    class VisionLoraSFTTrainer(ComponentLRMixin, trl.SFTTrainer):
        pass

    base = finetune_vlm.build_base("qwen2_vl")
    processor = build_processor(base)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # the collator does the processing
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = SyntheticVLMDataset("captioning", size=12, text_only_fraction=0.25).to_hf_dataset()
    trainer = VisionLoraSFTTrainer(
        model=base,
        args=args,
        train_dataset=dataset,
        data_collator=VisionChatCollator(processor),
        processing_class=processor,
        peft_config=VisionLoraConfig(r=4, task="captioning"),
        component_lr={"vision": 3e-3},
    )
    model = trainer.model
    assert model.peft_config["default"].peft_type.value == "VISION_LORA"
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert model.get_base_model().is_activation_checkpointing  # SFTConfig turns it on by default
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    vision_b = [n for n in initial if ".visual." in n and "lora_B" in n]
    assert vision_b and all(not torch.equal(dict(model.named_parameters())[n], initial[n]) for n in vision_b)
    rates = {g["component"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # "lr" is decayed by now
    assert rates == {"vision": pytest.approx(3e-3), "language": pytest.approx(1e-2)}


def test_reloaded_adapter_reproduces_the_trained_model(tmp_path):
    result = run_example(tmp_path, "--steps", "3", "--batch-size", "4", "--train-size", "12")
    reloaded = finetune_vlm.reload_adapter(finetune_vlm.build_base("qwen2_vl"), str(tmp_path))
    batch = result.collator([finetune_vlm.SyntheticVLMDataset("captioning", size=2, seed=5)[i] for i in range(2)])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model(**batch).logits)


def test_off_a_terminal_progress_is_plain_log_lines(tmp_path, capsys, monkeypatch):
    """transformers' convention: a tqdm bar only on a terminal; captured output gets one plain line per log."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    argv = ["--model-type", "qwen2_vl", "--output-dir", str(tmp_path), "--eval-size", "0", "--steps", "3"]
    finetune_vlm.finetune(finetune_vlm.build_parser().parse_args(argv))
    captured = capsys.readouterr()
    assert [line.split(" loss ")[0] for line in captured.out.splitlines() if line.startswith("step ")] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    assert "it/s" not in captured.err and "\r" not in captured.err  # no bar
