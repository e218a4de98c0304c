"""Image-text chat collator: chat examples -> a model batch whose labels train only on the assistant's replies.

The processor does the family-specific work (chat template, image placeholder expansion, pixel tensors, Mllama's
cross-attention mask, ...). What the collator adds is the label mask, found without knowing any template: for
every assistant turn it renders the conversation up to the turn's header (``add_generation_prompt=True``) and up
to the end of the turn, runs both through the processor with the images seen so far, and keeps the tokens in
between. It then checks that each rendering is a token prefix of the full conversation, so a template whose
tokens merge across the boundary fails loudly instead of training on a shifted mask. Prompt, padding and image
tokens are -100.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import ProcessorMixin

from .recipes import RECIPES, image_placeholder_ids

__all__ = ["IGNORE_INDEX", "VisionChatCollator"]

IGNORE_INDEX = -100


def _image_parts(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return 0
    return sum(1 for part in content if part.get("type") == "image")


class VisionChatCollator:
    """Collate ``{"messages": [...], "images": [...]}`` examples for a VLM (see ``testing.synthetic`` for the format).

    Rows may have any number of images, including none, in one batch (PaliGemma needs at least one per row).
    Every assistant turn is trained on (including its end-of-turn token); everything else is -100.

    Args:
        processor: a transformers processor with a chat template, e.g. from
            :func:`~peft_vision_lora.testing.processors.build_processor`.
        model_type: the processor family (defaults to ``processor.model_type``, which ``build_processor`` sets).
    """

    def __init__(self, processor: ProcessorMixin, model_type: str | None = None) -> None:
        model_type = model_type or getattr(processor, "model_type", None)
        if model_type not in RECIPES:
            raise ValueError(
                f"VisionChatCollator supports the processor families {sorted(RECIPES)}; got {model_type!r}. "
                "Pass model_type=... when the processor does not carry one."
            )
        self.processor, self.model_type, self.recipe = processor, model_type, RECIPES[model_type]
        self.processor.model_type = model_type
        self.ignored_ids = torch.tensor(sorted(image_placeholder_ids(processor)))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for example in examples:
            self._validate(example)
        if self.model_type == "paligemma":
            return self._prefix_suffix_batch(examples)
        texts = [self._render(example["messages"]) for example in examples]
        batch = self._process(texts, [example.get("images") or [] for example in examples])
        spans = self._assistant_spans(examples, batch["input_ids"], batch["attention_mask"])
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
                labels[row, start:end] = batch["input_ids"][row, start:end]
        labels[torch.isin(batch["input_ids"], self.ignored_ids)] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    # ----------------------------------------------------------------------------------------------------------------

    def _validate(self, example: dict[str, Any]) -> None:
        messages, images = example.get("messages"), example.get("images") or []
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("Each example needs `messages` ending with an assistant turn (the text to train on).")
        placeholders = sum(_image_parts(m) for m in messages)
        if placeholders != len(images):
            raise ValueError(
                f"An example has {placeholders} image parts in its messages but {len(images)} images; "
                'add one {"type": "image"} content part per image, in order.'
            )
        if not images and not self.recipe.text_only_rows:
            raise ValueError(f"{self.model_type} cannot take text-only rows: give every example at least one image.")

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _process(self, texts: list[str], images: list[list[Any]], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the processor on a batch, passing images in the layout the family expects (or none at all)."""
        if not any(images):
            image_arg = None
        elif self.recipe.nested_images:
            image_arg = images
        else:
            image_arg = [image for row in images for image in row]
        out = self.processor(text=texts, images=image_arg, padding=True, return_tensors="pt", **kwargs)
        return dict(out)

    def _assistant_spans(
        self, examples: list[dict[str, Any]], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[list[tuple[int, int]]]:
        """(start, end) token positions of every assistant turn, per row, in the padded batch."""
        prefix_texts, prefix_images, owners = [], [], []
        for row, example in enumerate(examples):
            messages, images = example["messages"], example.get("images") or []
            for turn, message in enumerate(messages):
                if message.get("role") != "assistant":
                    continue
                seen = sum(_image_parts(m) for m in messages[:turn])
                prefix_texts.append(self._render(messages[:turn], add_generation_prompt=True))
                prefix_images.append(images[:seen])
                owners.append((row, turn, "start"))
                if turn < len(messages) - 1:  # the last turn ends where the conversation ends
                    prefix_texts.append(self._render(messages[: turn + 1]))
                    prefix_images.append(images[: seen + _image_parts(message)])
                    owners.append((row, turn, "end"))
        prefixes = self._process(prefix_texts, prefix_images)
        # Positions of real tokens per row, so left or right padding both work.
        real = [attention_mask[row].nonzero().flatten() for row in range(len(examples))]
        bounds: dict[tuple[int, int], dict[str, int]] = {}
        for i, (row, turn, side) in enumerate(owners):
            prefix = prefixes["input_ids"][i][prefixes["attention_mask"][i].bool()]
            full = input_ids[row, real[row]]
            if len(prefix) > len(full) or not torch.equal(full[: len(prefix)], prefix):
                raise ValueError(
                    f"The {self.model_type} chat template's rendering up to turn {turn} is not a token prefix of the "
                    "whole conversation (tokens merge across the boundary), so the prompt cannot be masked. End the "
                    "generation prompt with a special token or a newline."
                )
            bounds.setdefault((row, turn), {})[side] = len(prefix)
        spans: list[list[tuple[int, int]]] = [[] for _ in examples]
        for (row, _), sides in sorted(bounds.items()):
            start, end = sides["start"], sides.get("end", len(real[row]))
            if end > start:
                spans[row].append((int(real[row][start]), int(real[row][end - 1]) + 1))
        return spans

    def _prefix_suffix_batch(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """PaliGemma has no chat format: the prompt is a prefix (bidirectional attention), the answer a suffix."""
        prompts, answers = [], []
        for example in examples:
            messages = example["messages"]
            if [m["role"] for m in messages if m["role"] != "system"] != ["user", "assistant"]:
                raise ValueError("PaliGemma examples must be one user turn followed by one assistant turn.")
            prompts.append(self._render(messages[:-1]))
            answers.append(self._render([messages[-1]]).removesuffix(self.processor.tokenizer.eos_token))
        batch = self._process(prompts, [example["images"] for example in examples], suffix=answers)
        labels = batch["input_ids"].clone()
        labels[batch["token_type_ids"] == 0] = IGNORE_INDEX  # the prefix: images, <bos>, prompt, "\n"
        labels[torch.isin(batch["input_ids"], self.ignored_ids)] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch
