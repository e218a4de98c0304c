"""Image-text chat collator: chat examples -> a model batch whose labels train only on the assistant's replies.

The processor does the family-specific work (chat template, image placeholder expansion, pixel tensors, Mllama's
cross-attention mask, ...), once per batch. What the collator adds is the label mask, found without knowing any
template: for every assistant turn it renders the conversation up to the turn's header (``add_generation_prompt=True``)
and up to the end of the turn and tokenizes those prefixes as text only (no images). It checks that each prefix is a
token prefix of the whole conversation's text-only tokens (a template whose tokens merge across the boundary fails
loudly instead of training on a shifted mask), then maps the prefix lengths into the processed batch by aligning the
text-only tokens with the processor's: every token the processor inserted for an image is unmatched, so the images
are never processed twice and image expansions of any family are masked. Prompt, padding and image tokens are -100.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import torch
from transformers import ProcessorMixin

from .chat_dataset import open_image
from .recipes import ChatRecipe, image_placeholder_ids, infer_model_type, recipe_for

__all__ = ["IGNORE_INDEX", "VisionChatCollator"]

IGNORE_INDEX = -100
# Batch entries laid out along the sequence: cut and re-padded with the tokens when max_length truncates.
_SEQUENCE_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask"}


class VisionChatCollator:
    """Collate ``{"messages": [...], "images": [...]}`` examples for a VLM (see ``load_chat_dataset`` for the format).

    Rows may have any number of images, including none, in one batch (PaliGemma needs at least one per row). Image
    parts may also carry their image (``{"type": "image", "image": PIL.Image | path}``) instead of ``images``.
    Every assistant turn is trained on (including its end-of-turn token); everything else is -100.

    Args:
        processor: any transformers image-text-to-text processor with a chat template, e.g.
            ``AutoProcessor.from_pretrained(checkpoint)``.
        model_type: the processor family; inferred from the processor (its ``model_type``, class or tokenizer), or
            from ``model``, when omitted. Only families that really differ have a recipe; others use the generic one.
        model: the model the batches are for, to read the family from its config when the processor does not say.
        max_length: cap on tokens per row. Rows are cut after their last assistant turn that fits whole (end-of-turn
            token included), never inside image tokens; a row whose first answer or last image ends past
            ``max_length`` is dropped with a warning (its batch is then processed again without it).
        processor_kwargs: passed to every processor call, e.g. ``{"max_pixels": 256 * 28 * 28}`` (Qwen2-VL) or
            ``{"size": {"height": 224, "width": 224}}``: fewer pixels, fewer image tokens, less memory.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        model_type: str | None = None,
        *,
        model: Any = None,
        max_length: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no chat template: set processor.chat_template (a Jinja string) "
                "or load a processor whose checkpoint has one."
            )
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}.")
        self.processor = processor
        self.model_type = model_type or infer_model_type(processor, model)
        self.recipe: ChatRecipe = recipe_for(self.model_type)
        self.max_length, self.processor_kwargs = max_length, dict(processor_kwargs or {})
        self.ignored_ids = torch.tensor(sorted(image_placeholder_ids(processor, self.model_type)))

    # Columns a dataset must keep for this collator (the Trainer reads it; see integrations/training.py).
    input_columns = ("images", "messages")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [self._prepare(i, example) for i, example in enumerate(examples)]
        if self.model_type == "paligemma":
            batch = self._prefix_suffix_batch(examples)
            inserted = torch.zeros_like(batch["attention_mask"])  # its image tokens are all named: none to find
        else:
            batch, inserted = self._chat_batch(examples)
        if self.max_length is None:
            return batch
        return self._truncate(examples, batch, inserted)

    # ----------------------------------------------------------------------------------------------------------------

    def _prepare(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        """Check an example and move images carried by content parts into ``images``."""
        messages, images = example.get("messages"), list(example.get("images") or [])
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"Example {index} of the batch needs `messages` ending with an assistant turn (the text to train on)."
            )
        carried, clean, placeholders = [], [], 0
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") in ("image", "image_url"):
                        placeholders += 1
                        payload = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                        if payload is not None:
                            carried.append(open_image(payload))
                        part = {"type": "image"}
                    parts.append(part)
                message = {**message, "content": parts}
            clean.append(message)
        if carried and images:
            raise ValueError(
                f"Example {index} gives images both in `images` and inside its image parts: use one or the other."
            )
        images = images or carried
        if placeholders != len(images):
            raise ValueError(
                f"Example {index} has {placeholders} image parts in its messages but {len(images)} images; "
                'add one {"type": "image"} content part per image, in order (or load rows with load_chat_dataset).'
            )
        if not images and not self.recipe.text_only_rows:
            raise ValueError(f"{self.model_type} cannot take text-only rows: give every example at least one image.")
        return {"messages": clean, "images": images}

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,  # pragma: no mutate (False is the default, and None is as falsy: the text either way)
        )

    def _process(self, texts: list[str], images: list[list[Any]], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the processor on a batch, passing images in the layout the family expects (or none at all)."""
        if not any(images):
            image_arg = None
        elif self.recipe.nested_images:
            image_arg = images
        else:
            image_arg = [image for row in images for image in row]
        options = {**self.processor_kwargs, **kwargs}
        out = self.processor(text=texts, images=image_arg, padding=True, return_tensors="pt", **options)
        return dict(out)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.processor.tokenizer(texts)["input_ids"]

    def _chat_batch(self, examples: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The processed batch with labels, and a mask of the tokens the processor inserted for images."""
        texts = [self._render(example["messages"]) for example in examples]
        batch = self._process(texts, [example["images"] for example in examples])
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        inserted = torch.zeros_like(input_ids, dtype=torch.bool)
        plain = self._tokenize(texts)
        for row, example in enumerate(examples):
            real = mask[row].nonzero().flatten()  # positions of real tokens: left or right padding both work
            processed = input_ids[row, real].tolist()
            to_processed, extra = _align(plain[row], processed)
            inserted[row, real[extra]] = True
            for start, end in self._assistant_bounds(row, example["messages"], plain[row]):
                span = real[to_processed(start) : to_processed(end)]
                labels[row, span] = input_ids[row, span]
        labels[torch.isin(input_ids, self.ignored_ids) | inserted] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch, inserted

    def _assistant_bounds(self, row: int, messages: list[dict[str, Any]], full: list[int]) -> list[tuple[int, int]]:
        """(start, end) of every assistant turn in the text-only tokens ``full`` of the whole conversation."""
        bounds = []
        for turn, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            # the conversation up to the turn's header, and up to the turn's end (the whole one for the last turn)
            prefixes = [self._render(messages[:turn], add_generation_prompt=True), self._render(messages[: turn + 1])]
            lengths = []
            for prefix in self._tokenize(prefixes):
                if full[: len(prefix)] != prefix:
                    raise ValueError(
                        f"The {self.model_type} chat template's rendering up to turn {turn} of example {row} is not "
                        "a token prefix of the whole conversation (tokens merge across the boundary), so the prompt "
                        "cannot be masked. End the generation prompt with a special token or a newline."
                    )
                lengths.append(len(prefix))
            bounds.append((lengths[0], lengths[1]))
        return bounds

    def _prefix_suffix_batch(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """PaliGemma has no chat format: the prompt is a prefix (bidirectional attention), the answer a suffix."""
        prompts, answers = [], []
        for example in examples:
            messages = example["messages"]
            if [m["role"] for m in messages if m["role"] != "system"] != ["user", "assistant"]:
                raise ValueError("PaliGemma examples must be one user turn followed by one assistant turn.")
            prompts.append(self._render(messages[:-1]))
            answers.append(self._render([messages[-1]]).removesuffix(self.processor.tokenizer.eos_token))
        # The processor labels the suffix itself: input_ids, -100 wherever token_type_ids is 0 (images, <bos>, prompt,
        # "\n" and padding).
        return self._process(prompts, [example["images"] for example in examples], suffix=answers)

    # ----------------------------------------------------------------------------------------------------------------

    def _truncate(
        self, examples: list[dict[str, Any]], batch: dict[str, torch.Tensor], inserted: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Cut rows longer than ``max_length`` after their last whole answer; drop rows that cannot be cut."""
        limit, mask = self.max_length, batch["attention_mask"]
        image = torch.isin(batch["input_ids"], self.ignored_ids) | inserted
        keep_lengths: list[int] = []
        dropped: list[int] = []
        for row in range(len(examples)):
            real = mask[row].nonzero().flatten()
            trained = (batch["labels"][row, real] != IGNORE_INDEX).tolist()
            ends = [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]
            ends.append(len(real))  # a row that fits is kept whole
            cut = max((end for end in ends if end <= limit), default=0)
            images_at = image[row, real].nonzero().flatten()
            if cut == 0 or (len(images_at) and int(images_at[-1]) >= cut):
                dropped.append(row)
            keep_lengths.append(cut)
        if dropped:
            kept = [example for row, example in enumerate(examples) if row not in dropped]
            if not kept:
                raise ValueError(
                    f"Every example of the batch needs more than max_length={limit} tokens for its images and first "
                    "answer: raise max_length or lower the image resolution (processor_kwargs)."
                )
            warnings.warn(
                f"Dropped batch rows {dropped}: their images or first answer end past max_length={limit} tokens "
                "(an answer without its end-of-turn token, or image tokens without their image, would train wrongly).",
                stacklevel=3,
            )
            return self(kept)
        return _cut_rows(batch, keep_lengths, self.processor.tokenizer)


def _align(plain: list[int], processed: list[int]) -> tuple[Any, torch.Tensor]:
    """Map positions in the text-only tokens to the processor's tokens; also the positions the processor inserted.

    Processors only insert tokens (image expansions), so a greedy walk matches every text token in order; if it ever
    cannot (a processor that also rewrites text), a full diff does the alignment.
    """
    pairs: list[tuple[int, int]] = []
    j = 0
    for i, token in enumerate(plain):
        while j < len(processed) and processed[j] != token:
            j += 1
        if j == len(processed):
            break
        pairs.append((i, j))
        j += 1
    if len(pairs) != len(plain):
        matcher = difflib.SequenceMatcher(
            None,
            plain,
            processed,
            autojunk=False,  # pragma: no mutate (None is as falsy); test_align_of_a_long_rewritten_row checks it
        )
        pairs = [(b.a + k, b.b + k) for b in matcher.get_matching_blocks() for k in range(b.size)]
    to_processed = dict(pairs)
    matched = {j for _, j in pairs}

    def position(i: int) -> int:  # an unmatched boundary token maps to the next matched one, or to the end
        return next((to_processed[k] for k in range(i, len(plain)) if k in to_processed), len(processed))

    extra = torch.tensor([j for j in range(len(processed)) if j not in matched], dtype=torch.long)
    return position, extra


def _cut_rows(batch: dict[str, torch.Tensor], lengths: list[int], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Keep the first ``lengths[row]`` real tokens of each row and re-pad every sequence-shaped entry."""
    mask = batch["attention_mask"]
    width, left = max(lengths), tokenizer.padding_side == "left"
    pad = {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}  # the processor padded: the pad token is set
    out = dict(batch)
    for key, value in batch.items():
        if key not in _SEQUENCE_KEYS | {"labels"}:
            continue
        cut = value.new_full((value.shape[0], width, *value.shape[2:]), pad.get(key, 0))
        for row, length in enumerate(lengths):
            real = mask[row].nonzero().flatten()[:length]
            if left:
                cut[row, width - length :] = value[row, real]
            else:
                cut[row, :length] = value[row, real]
        out[key] = cut
    return out
