"""What the collator must know about each processor family: how it takes images, and which tokens are images.

Processors differ in two ways a collator cannot read off them: whether images come as one list per row or one flat
list for the batch, and whether a batch may hold rows without any image (PaliGemma's may not). The tokens that stand
for or frame an image are never trained on (the model cannot predict pixels); they are named here by their text, and
looked up in the processor's own tokenizer, together with the image tokens every processor names itself
(``image_token``, ``boi_token``, ...). Any other family takes the generic recipe: images one list per row (what
current transformers processors accept), text-only rows allowed, image tokens from those attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from transformers import ProcessorMixin

__all__ = [
    "GENERIC_RECIPE",
    "PROCESSOR_MODEL_TYPES",
    "RECIPES",
    "ChatRecipe",
    "image_placeholder_ids",
    "infer_model_type",
    "recipe_for",
]


@dataclass(frozen=True)
class ChatRecipe:
    """How one processor family takes a batch of chats with images."""

    nested_images: bool  # processor wants images as one list per row (else one flat list for the batch)
    text_only_rows: bool  # rows without images are allowed in a batch
    image_tokens: tuple[str, ...]  # tokens that stand for or frame images: never trained on


_QWEN = ChatRecipe(
    nested_images=False,
    text_only_rows=True,
    image_tokens=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
)
_LLAVA = ChatRecipe(nested_images=False, text_only_rows=True, image_tokens=("<image>",))
_IDEFICS3 = ChatRecipe(
    nested_images=True, text_only_rows=True, image_tokens=("<image>", "<fake_token_around_image>", "<global-img>")
)

RECIPES: dict[str, ChatRecipe] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "paligemma": ChatRecipe(nested_images=True, text_only_rows=False, image_tokens=("<image>",)),
    "gemma3": ChatRecipe(
        nested_images=True,
        text_only_rows=True,
        image_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
    ),
    "mllama": ChatRecipe(nested_images=True, text_only_rows=True, image_tokens=("<|image|>",)),
}
PROCESSOR_MODEL_TYPES: tuple[str, ...] = tuple(RECIPES)
GENERIC_RECIPE = ChatRecipe(nested_images=True, text_only_rows=True, image_tokens=())
# Attributes under which processors and tokenizers name the tokens that stand for or frame images and videos.
_IMAGE_TOKEN_ATTRIBUTES = (
    "image_token",
    "video_token",
    "boi_token",
    "eoi_token",
    "fake_image_token",
    "global_image_token",
    "image_start_token",
    "image_end_token",
    "vision_start_token",
    "vision_end_token",
)
_TRANSFORMERS_MODULE = re.compile(r"^transformers\.models\.(\w+)\.(processing|tokenization|image_processing)")


def recipe_for(model_type: str | None) -> ChatRecipe:
    """The family's recipe, or the generic one for families that need nothing special."""
    return RECIPES.get(model_type or "", GENERIC_RECIPE)


def infer_model_type(processor: ProcessorMixin, model: Any = None) -> str | None:
    """The processor family: ``processor.model_type`` (set by ``build_processor``), the model's config, or the
    transformers module the processor class comes from (``AutoProcessor`` output). ``None`` when none says."""
    declared = getattr(processor, "model_type", None)
    if isinstance(declared, str):
        return declared
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "model_type", None), str):
        return config.model_type
    for owner in (processor, getattr(processor, "image_processor", None), getattr(processor, "tokenizer", None)):
        for cls in type(owner).__mro__ if owner is not None else ():
            match = _TRANSFORMERS_MODULE.match(cls.__module__)
            if match:
                return match.group(1)
    return None


def image_placeholder_ids(processor: ProcessorMixin, model_type: str | None = None) -> set[int]:
    """Ids, in ``processor``'s tokenizer, of the tokens that stand for or frame images (absent tokens are skipped)."""
    tokenizer = processor.tokenizer
    tokens = set(recipe_for(model_type or infer_model_type(processor)).image_tokens)
    for owner in (processor, tokenizer):
        tokens |= {v for name in _IMAGE_TOKEN_ATTRIBUTES if isinstance(v := getattr(owner, name, None), str)}
    ids = {tokenizer.convert_tokens_to_ids(token) for token in tokens}
    return ids - {None, tokenizer.unk_token_id}
