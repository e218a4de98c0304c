"""PEFT features that special-case PeftType.LORA: what works for VISION_LORA and what fails clearly."""

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter

from peft_vision_lora import VisionLoraConfig


def _saved_adapter(path, seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(fresh_model("qwen2_vl"), VisionLoraConfig(r=4, init_lora_weights=False)).eval()
    model.save_pretrained(path)
    with torch.no_grad():
        return model(**inputs_for("qwen2_vl")).logits


def test_hotswap_replaces_weights_in_place(tmp_path):
    _saved_adapter(tmp_path / "a", seed=1)
    expected_b = _saved_adapter(tmp_path / "b", seed=2)
    model = PeftModel.from_pretrained(fresh_model("qwen2_vl"), tmp_path / "a").eval()
    hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for("qwen2_vl")).logits, expected_b, rtol=1e-5, atol=1e-6)


def test_mixed_model_is_refused_clearly():
    from peft import get_peft_model as get

    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get(fresh_model("llava"), VisionLoraConfig(r=4), mixed=True)


def test_causal_lm_task_type_and_generate():
    config = VisionLoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(fresh_model("llava"), config).eval()
    batch = inputs_for("llava")
    batch.pop("labels")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
