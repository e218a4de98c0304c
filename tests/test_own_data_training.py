"""Your own data end to end: a checkpoint folder and a JSONL of image paths train with the Trainer's defaults and
with ``examples/finetune_vlm.py --model DIR --data FILE``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fresh_model
from peft import get_peft_model
from test_training import finetune_vlm
from transformers import Trainer, TrainingArguments

from peft_vision_lora import VisionLoraConfig
from peft_vision_lora.data import VisionChatCollator, load_chat_dataset
from peft_vision_lora.integrations.training import VisionLoraTrainer
from peft_vision_lora.testing import SyntheticVLMDataset, build_processor


@pytest.fixture
def own_data(tmp_path):
    """A folder of PNGs and a flat JSONL (image path, question, answer) made from the synthetic captioning task."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, example in enumerate(SyntheticVLMDataset("captioning", size=8, seed=0)):
        example["images"][0].save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "Describe the image.", "answer": example["answer"]})
    rows.append({"question": "Say hi.", "answer": "hi"})  # a text-only row
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return data, images


def test_vision_lora_trainer_trains_on_loaded_data_with_default_training_arguments(tmp_path, own_data):
    data, images = own_data
    dataset = load_chat_dataset(data, image_root=images)
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, task="captioning"))
    args = TrainingArguments(  # remove_unused_columns keeps its default (True)
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3, use_cpu=True, report_to="none"
    )
    assert args.remove_unused_columns
    collator = VisionChatCollator(build_processor("qwen2_vl"))
    with pytest.raises(ValueError, match="No columns in the dataset match"):  # what plain Trainer does
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = VisionLoraTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("visual" in n for n in changed) and any("language_model" in n for n in changed)


def test_finetune_example_takes_a_checkpoint_folder_and_a_data_file(tmp_path, own_data):
    data, images = own_data
    checkpoint = tmp_path / "checkpoint"
    finetune_vlm.build_base("qwen2_vl").save_pretrained(checkpoint)
    build_processor("qwen2_vl").save_pretrained(checkpoint)
    argv = ["--model", str(checkpoint), "--data", str(data), "--image-root", str(images), "--max-pixels", "1024"]
    argv += ["--max-length", "64", "--steps", "3", "--batch-size", "3", "--output-dir", str(tmp_path / "out")]
    result = finetune_vlm.main([*argv, "--quiet"])
    assert len(result.losses) == 3 and result.accuracy is None
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert result.collator.model_type == "qwen2_vl"  # read off the AutoProcessor-loaded class
    assert result.collator.processor_kwargs == {"size": {"shortest_edge": 1024, "longest_edge": 1024}}
    with pytest.raises(ValueError, match="--processor-kwargs"):
        finetune_vlm.processor_kwargs(finetune_vlm.build_parser().parse_args(["--max-pixels", "9"]), _llava())


def _llava():
    return build_processor("llava")
