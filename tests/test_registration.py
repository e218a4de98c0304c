"""VISION_LORA is a real PEFT type: registered through PEFT's own API, idempotently."""

import copy
import pickle

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.utils.peft_types import PeftType

import peft_vision_lora
from peft_vision_lora import VisionLoraConfig, VisionLoraModel


def test_peft_type_member_behaves_like_builtin_ones():
    member = PeftType.VISION_LORA
    assert member.value == "VISION_LORA"
    assert PeftType("VISION_LORA") is member and PeftType["VISION_LORA"] is member
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    assert member == "VISION_LORA"


def test_mappings_point_at_our_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VISION_LORA] is VisionLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VISION_LORA] is VisionLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.VISION_LORA] == "lora_"
    assert issubclass(VisionLoraModel, LoraModel)


def test_registration_is_idempotent():
    peft_vision_lora.register_vision_lora()
    peft_vision_lora.register_vision_lora()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VISION_LORA] is VisionLoraModel
