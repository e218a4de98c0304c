"""What the collator must know about each processor family: how it takes images, and which tokens are images.

Processors differ in two ways a collator cannot read off them: whether images come as one list per row or one flat
list for the batch, and whether a batch may hold rows without any image (PaliGemma's may not). The tokens that stand
for or frame an image are never trained on (the model cannot predict pixels); they are named here by their text, and
looked up in the processor's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import ProcessorMixin

__all__ = ["PROCESSOR_MODEL_TYPES", "RECIPES", "ChatRecipe", "image_placeholder_ids"]


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


def image_placeholder_ids(processor: ProcessorMixin) -> set[int]:
    """Ids, in ``processor``'s tokenizer, of the tokens that stand for or frame images (absent tokens are skipped)."""
    tokenizer = processor.tokenizer
    recipe = RECIPES[processor.model_type]
    ids = {tokenizer.convert_tokens_to_ids(token) for token in recipe.image_tokens}
    return ids - {None, tokenizer.unk_token_id}
