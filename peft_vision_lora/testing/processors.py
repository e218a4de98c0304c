"""Build real transformers processors offline for the tiny VLMs: no hub download, nothing cached on disk.

A processor is an image processor plus a tokenizer plus a chat template. Here the image processor is the family's
class built from its defaults with the sizes the tiny config needs (32x32 images, 8x8 patches), and the tokenizer is
a byte-level BPE trained in code (``tokenizers``) on the synthetic tasks' text. Its id layout matches
``peft_vision_lora.tiny_models``: pad/bos/eos at 0-2, learned tokens below 500, and the family's special tokens at
500-511 with the image placeholder at 511 (video 510, image start 509, image end 508), so that the ids the
processor writes are the ids the tiny model's config expects.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin

from ..data.image_only import image_only_processor_class
from ..data.recipes import PROCESSOR_MODEL_TYPES
from ..zoo.tiny import END_TOKEN, IMAGE, IMAGE_TOKEN, START_TOKEN, VIDEO_TOKEN, VOCAB, tiny_config
from .synthetic import tokenizer_corpus

__all__ = ["PROCESSOR_MODEL_TYPES", "build_processor", "build_tokenizer"]

FIRST_SPECIAL = 500  # ids from here on are the family's special tokens (tiny_models reserves 500-511)

# Chat templates: the families' own formats, reduced to what the synthetic chats use (text and image parts).
# Each renders `messages` and, with add_generation_prompt, the assistant header the answer follows.
_CONTENT = (
    "{% macro content(message, image) %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ image }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
)
QWEN_TEMPLATE = (
    _CONTENT + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ content(message, '<|vision_start|><|image_pad|><|vision_end|>') }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (  # LLaVA-1.5: "USER: <image>\nDescribe. ASSISTANT: a red square</s>"
    _CONTENT + "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{{ content(message, '<image>\n') }} {% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {{ content(message, '') }}</s>{% else %}{{ content(message, '') }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IDEFICS3_TEMPLATE = (  # "<|begin_of_text|>User:<image>Describe.<end_of_utterance>\nAssistant: ..."
    _CONTENT + "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}:{% else %}: "
    "{% endif %}{{ content(message, '<image>') }}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>")
PALIGEMMA_TEMPLATE = (  # no chat format: images then the user's text; the processor adds <bos> and "\n"
    _CONTENT + "{% for message in messages %}{% if message['role'] == 'user' %}{{ content(message, '<image>') }}"
    "{% elif message['role'] == 'assistant' %}{{ content(message, '') }}<eos>{% endif %}{% endfor %}"
)
GEMMA3_TEMPLATE = (
    _CONTENT + "<bos>{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ content(message, '<start_of_image>') }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MLLAMA_TEMPLATE = (
    _CONTENT + "<|begin_of_text|>{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ content(message, '<|image|>') }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens of one family: names of ids 0-2, tokens placed at fixed ids >= 500, tokenizer attributes."""

    pad: str
    bos: str
    eos: str
    fixed: dict[int, str]
    attributes: dict[str, str] = field(default_factory=dict)  # e.g. {"image_token": "<image>"}


_QWEN = TokenizerSpec(
    "<|endoftext|>",
    "<|endoftext_bos|>",
    "<|im_end|>",
    {
        500: "<|im_start|>",
        END_TOKEN: "<|vision_end|>",
        START_TOKEN: "<|vision_start|>",
        VIDEO_TOKEN: "<|video_pad|>",
        IMAGE_TOKEN: "<|image_pad|>",
    },
    {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
)
_LLAVA = TokenizerSpec("<pad>", "<s>", "</s>", {IMAGE_TOKEN: "<image>"}, {"image_token": "<image>"})
_IDEFICS3 = TokenizerSpec(
    "<|end_of_text|>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    {500: "<fake_token_around_image>", 501: "<global-img>", 502: "<|im_start|>", IMAGE_TOKEN: "<image>"},
    {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>"},
)
_PALIGEMMA = TokenizerSpec("<pad>", "<bos>", "<eos>", {IMAGE_TOKEN: "<image>"}, {"image_token": "<image>"})
_GEMMA3 = TokenizerSpec(
    "<pad>",
    "<bos>",
    "<eos>",
    {500: "<start_of_turn>", 501: "<end_of_turn>", END_TOKEN: "<end_of_image>", START_TOKEN: "<start_of_image>"}
    | {IMAGE_TOKEN: "<image_soft_token>"},
    {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
)
_MLLAMA = TokenizerSpec(
    "<|finetune_right_pad_id|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    {500: "<|start_header_id|>", 501: "<|end_header_id|>", 502: "<|python_tag|>", IMAGE_TOKEN: "<|image|>"},
    {"image_token": "<|image|>"},
)


@dataclass(frozen=True)
class TinyProcessorRecipe:
    """How one family's offline processor is made: its tokenizer's special tokens and its chat template."""

    spec: TokenizerSpec
    template: str


TINY_RECIPES: dict[str, TinyProcessorRecipe] = {
    "qwen2_vl": TinyProcessorRecipe(_QWEN, QWEN_TEMPLATE),
    "qwen2_5_vl": TinyProcessorRecipe(_QWEN, QWEN_TEMPLATE),
    "llava": TinyProcessorRecipe(_LLAVA, LLAVA_TEMPLATE),
    "llava_next": TinyProcessorRecipe(_LLAVA, LLAVA_TEMPLATE),
    "idefics3": TinyProcessorRecipe(_IDEFICS3, IDEFICS3_TEMPLATE),
    "smolvlm": TinyProcessorRecipe(_IDEFICS3, SMOLVLM_TEMPLATE),
    "paligemma": TinyProcessorRecipe(_PALIGEMMA, PALIGEMMA_TEMPLATE),
    "gemma3": TinyProcessorRecipe(_GEMMA3, GEMMA3_TEMPLATE),
    "mllama": TinyProcessorRecipe(_MLLAMA, MLLAMA_TEMPLATE),
}


@functools.cache
def _trained_bpe(pad: str, bos: str, eos: str) -> str:
    """Byte-level BPE trained on the synthetic text, as JSON (cached: training is deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=FIRST_SPECIAL,
        special_tokens=[pad, bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(tokenizer_corpus()), trainer)
    return tokenizer.to_str()


def build_tokenizer(spec: TokenizerSpec, vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A fast tokenizer with ``spec``'s tokens at their fixed ids; unused ids up to ``vocab_size`` get fillers."""
    tokenizer = Tokenizer.from_str(_trained_bpe(spec.pad, spec.bos, spec.eos))
    learned = tokenizer.get_vocab_size()
    if learned > FIRST_SPECIAL or max(spec.fixed) >= vocab_size:
        raise ValueError(f"special ids {sorted(spec.fixed)} do not fit a vocabulary of {vocab_size}")
    slots = {i: f"<|reserved_{i}|>" for i in range(learned, vocab_size)} | spec.fixed
    tokenizer.add_special_tokens([slots[i] for i in range(learned, vocab_size)])  # added tokens take the next ids
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=spec.pad,
        bos_token=spec.bos,
        eos_token=spec.eos,
        extra_special_tokens=dict(spec.attributes),
        padding_side="right",
    )
    wrong = {token: i for i, token in spec.fixed.items() if fast.convert_tokens_to_ids(token) != i}
    if wrong:  # pragma: no cover - guards the id layout the tiny configs depend on
        raise RuntimeError(f"special tokens landed on the wrong ids: {wrong}")
    return fast


def _sizes(config: PretrainedConfig) -> tuple[int, int]:
    vision = config.vision_config
    image, patch = getattr(vision, "image_size", IMAGE), vision.patch_size  # Qwen2-VL resizes freely: use 32
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return image, patch


def _check_fits(config: PretrainedConfig, model_type: str) -> None:
    text = config.get_text_config()
    image_id = getattr(config, "image_token_id", None)
    if text.vocab_size != VOCAB or image_id != IMAGE_TOKEN:
        raise ValueError(
            f"build_processor makes processors for the tiny {model_type} models of peft_vision_lora.tiny_models "
            f"(vocab {VOCAB}, image token id {IMAGE_TOKEN}); this config has vocab {text.vocab_size} and image token "
            f"id {image_id}. For a real checkpoint use AutoProcessor.from_pretrained(...)."
        )


def _image_processor_and_kwargs(model_type: str, config: PretrainedConfig) -> tuple[Any, dict[str, Any]]:
    """The family's image processor sized for the tiny config, and the processor's extra constructor kwargs."""
    image, patch = _sizes(config)
    square = {"height": image, "width": image}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = config.vision_config
        pixels = image * image  # min = max pixels: every image is resized to image x image
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels},
            patch_size=patch,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        return processor, {}
    if model_type in ("llava", "llava_next"):
        strategy = {"vision_feature_select_strategy": config.vision_feature_select_strategy}
        # CLIP adds a CLS token; the "default" strategy drops it again.
        extra = {"patch_size": patch, "num_additional_image_tokens": 1, **strategy}
        if model_type == "llava":
            from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

            return LlavaImageProcessorPil(size={"shortest_edge": image}, crop_size=square), extra
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image}, crop_size=square, image_grid_pinpoints=config.image_grid_pinpoints
        )
        return processor, extra
    if model_type == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        processor = Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": image}, max_image_size={"longest_edge": image}
        )
        # pixel shuffle folds scale x scale patches into one token
        return processor, {"image_seq_len": (image // patch) ** 2 // config.scale_factor**2}
    if model_type == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        processor = SmolVLMImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": image}, max_image_size={"longest_edge": image}
        )
        extra = {"image_seq_len": (image // patch) ** 2 // config.scale_factor**2}
        return processor, extra
    if model_type == "paligemma":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        processor = SiglipImageProcessorPil(size=square)
        processor.image_seq_length = (image // patch) ** 2  # PaliGemmaProcessor reads it from the image processor
        return processor, {}
    if model_type == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        processor = Gemma3ImageProcessorPil(size=square, do_pan_and_scan=False)
        return processor, {"image_seq_length": config.mm_tokens_per_image}
    if model_type == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        return MllamaImageProcessorPil(size=square, max_image_tiles=config.vision_config.max_num_tiles), {}
    raise ValueError(f"No processor recipe for {model_type!r}; supported: {', '.join(PROCESSOR_MODEL_TYPES)}")


def _processor_class(model_type: str) -> type[ProcessorMixin]:
    import transformers

    names = {
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "llava": "LlavaProcessor",
        "llava_next": "LlavaNextProcessor",
        "idefics3": "Idefics3Processor",
        "paligemma": "PaliGemmaProcessor",
        "gemma3": "Gemma3Processor",
        "mllama": "MllamaProcessor",
        "smolvlm": "SmolVLMProcessor",
    }
    cls = getattr(transformers, names[model_type])
    return image_only_processor_class(cls) if "video_processor" in cls.get_attributes() else cls


def build_processor(model_or_type: Any) -> ProcessorMixin:
    """The real processor class of a tiny VLM, built offline (a model, a config or a ``model_type`` string).

    The result has ``chat_template`` set and ``processor.model_type``; pass it to
    :class:`~peft_vision_lora.data.collator.VisionChatCollator`.
    """
    if isinstance(model_or_type, str):
        config = tiny_config(model_or_type)
    else:
        config = model_or_type if isinstance(model_or_type, PretrainedConfig) else model_or_type.config
    model_type = config.model_type
    if model_type not in TINY_RECIPES:
        raise ValueError(
            f"No offline processor for model type {model_type!r}; supported: {', '.join(PROCESSOR_MODEL_TYPES)}."
        )
    _check_fits(config, model_type)
    recipe = TINY_RECIPES[model_type]
    image_processor, extra = _image_processor_and_kwargs(model_type, config)
    tokenizer = build_tokenizer(recipe.spec, vocab_size=config.get_text_config().vocab_size)
    processor_class = _processor_class(model_type)
    if "video_processor" in inspect.signature(processor_class.__init__).parameters:
        extra["video_processor"] = None
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=recipe.template, **extra
    )
    processor.model_type = model_type
    return processor
