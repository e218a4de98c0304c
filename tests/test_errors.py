"""Bad input fails early with an error that says what to do, and leaves the model untouched."""

import pytest
from helpers import fresh_model
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from peft_vision_lora import ComponentResolutionError, VisionLoraConfig, VisionLoraConfigError


def _no_lora_layers(model) -> bool:
    return not any(isinstance(m, LoraLayer) for m in model.modules())


def _text_only_model():
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def test_vision_layers_on_text_only_model():
    model = _text_only_model()
    with pytest.raises(ComponentResolutionError) as info:
        get_peft_model(model, VisionLoraConfig(r=4))
    message = str(info.value)
    assert "finetune_vision_layers=True" in message and "'llama'" in message
    assert "found:" in message and "finetune_vision_layers=False" in message
    assert _no_lora_layers(model)


def test_text_only_model_works_with_language_only():
    model = get_peft_model(_text_only_model(), VisionLoraConfig(r=4, task="vqa"))
    names = model.base_model.targeted_module_names
    assert names and all(n.startswith("model.layers.") for n in names)


def test_target_names_that_match_nothing():
    model = fresh_model("llava")
    with pytest.raises(VisionLoraConfigError) as info:
        get_peft_model(model, VisionLoraConfig(r=4, target_modules=["q_proj", "qkv_projection"]))
    assert "['qkv_projection'] match no linear layer" in str(info.value)
    assert "q_proj" in str(info.value)  # lists what is there
    assert _no_lora_layers(model)


def test_leaf_names_outside_chosen_components_select_nothing():
    # fc1/fc2 exist only in the CLIP vision tower; asking for them on the language model selects nothing.
    model = fresh_model("llava")
    with pytest.raises(VisionLoraConfigError, match="no linear layer matched: vision=False, language=True"):
        get_peft_model(model, VisionLoraConfig(r=4, task="vqa", target_modules=["fc1", "fc2"]))
    assert _no_lora_layers(model)


def test_projector_requested_where_none_exists():
    model = _text_only_model()
    with pytest.raises(ComponentResolutionError, match="no projector was found"):
        get_peft_model(model, VisionLoraConfig(r=4, task="vqa", finetune_projector=True))
    assert _no_lora_layers(model)


def test_model_whose_get_input_embeddings_raises():
    # PP-FormulaNet-style models raise here; PEFT's tied-embedding lookup must not stop the adapter.
    model = fresh_model("llava")

    def broken():
        raise NotImplementedError("no input embeddings")

    model.get_input_embeddings = broken
    model.config.tie_word_embeddings = True  # makes PEFT look the input embeddings up
    with pytest.warns(UserWarning, match="Could not determine weights tied"):
        peft_model = get_peft_model(model, VisionLoraConfig(r=4))
    assert peft_model.base_model.targeted_module_names
