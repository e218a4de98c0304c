"""Synthetic image-text tasks generated in code, small enough for a tiny VLM to learn from pixels.

Each design strategy gets a task it is meant for:

- ``captioning`` (vision + language): coloured shapes on backgrounds -> "a red square on a white background".
- ``ocr`` (vision + language): rendered digits -> "7".
- ``vqa`` (language only): questions about the same scenes -> "red" / "square" / "white".
- ``domain_adaptation`` (vision only): the captioning task seen through a colour shift (a different camera): the
  language is unchanged, only what the pixels look like moved.

Examples use the chat format that Hugging Face processors and TRL expect::

    {"images": [PIL.Image], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", ...}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
     "answer": "a red square on a white background", "task": "captioning"}

Every example is a pure function of ``(seed, index)``, so datasets need no storage and two processes (DDP ranks, a
resumed run) see identical data. ``text_only_fraction`` and ``max_images`` make batches with text-only rows and
mixed image counts, the cases a collator and DDP must survive.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("square", "circle", "triangle")
TASKS = ("captioning", "ocr", "vqa", "domain_adaptation")
# The strategy each task is meant to exercise (the design's table); examples and docs read it from here.
TASK_STRATEGY = {
    "captioning": "vision+language",
    "ocr": "vision+language",
    "vqa": "language",
    "domain_adaptation": "vision",
}
PROMPTS = {
    "captioning": "Describe the image.",
    "ocr": "Read the number.",
    "domain_adaptation": "Describe the image.",
}
# With several images of the same task, one plural instruction; VQA questions are asked one after another.
MULTI_IMAGE_PROMPTS = {
    "captioning": "Describe the images.",
    "ocr": "Read the numbers.",
    "domain_adaptation": "Describe the images.",
}


@dataclass(frozen=True)
class Scene:
    """One coloured shape on a plain background; positions and sizes are in pixels of a ``side`` x ``side`` image."""

    shape: str
    colour: str
    background: str
    centre: tuple[int, int]
    radius: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, side: int = 32) -> Scene:
    # Large shapes near the middle: a tiny model sees them in most of its patches, so it can learn them quickly.
    radius = rng.randint(side * 5 // 16, side * 7 // 16)
    jitter = side // 8
    centre = (side // 2 + rng.randint(-jitter, jitter), side // 2 + rng.randint(-jitter, jitter))
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), centre, radius)


def render_scene(scene: Scene, side: int = 32, colour_shift: bool = False) -> Image.Image:
    """Draw ``scene``; ``colour_shift`` rotates the RGB channels and lowers contrast (the domain-shifted camera)."""
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    (x, y), r, fill = scene.centre, scene.radius, COLOURS[scene.colour]
    if scene.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    if colour_shift:
        red, green, blue = image.split()
        image = Image.merge("RGB", (green, blue, red)).point(lambda v: 64 + v // 2)
    return image


def render_number(text: str, rng: random.Random, side: int = 32) -> Image.Image:
    """Dark characters on a light background, filling most of the image, jittered by a few pixels."""
    image = Image.new("RGB", (side, side), (235, 235, 235))
    font = ImageFont.load_default(size=side * 3 // (2 + len(text)))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    jitter = side // 10
    x = (side - (right - left)) // 2 - left + rng.randint(-jitter, jitter)
    y = (side - (bottom - top)) // 2 - top + rng.randint(-jitter, jitter)
    draw.text((x, y), text, fill=(20, 20, 20), font=font)
    return image


def _chat(prompt: str, answer: str, num_images: int) -> list[dict[str, Any]]:
    user = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _vqa_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        return f"What colour is the {scene.shape}?", scene.colour
    if kind == 1:
        return "What shape is in the image?", scene.shape
    return "What colour is the background?", scene.background


# Words the tasks answer with; text-only rows use them so that a language model meets them without images.
ANSWER_WORDS = (*COLOURS, *SHAPES, *BACKGROUNDS, *(str(n) for n in range(100)))


def _text_only(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    words = " ".join(rng.choice(ANSWER_WORDS) for _ in range(rng.randint(1, 3)))
    return f"Repeat: {words}", words


class SyntheticVLMDataset(Dataset):
    """``size`` chat examples of ``task``; indexable and deterministic (a pure function of ``seed`` and index).

    Args:
        task: one of ``TASKS``.
        size: number of examples.
        seed: different seeds give disjoint-looking data (use one seed for train, another for held-out).
        image_size: side of the square images (the tiny models take 32).
        text_only_fraction: share of rows replaced by a text-only question (arithmetic), for mixed batches.
        max_images: rows get 1..max_images images (captions joined with "and"); 1 keeps one image per row.
    """

    def __init__(
        self,
        task: str = "captioning",
        size: int = 256,
        seed: int = 0,
        image_size: int = 32,
        text_only_fraction: float = 0.0,
        max_images: int = 1,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"Unknown synthetic task {task!r}; choose one of {TASKS}.")
        if not 0.0 <= text_only_fraction <= 1.0:
            raise ValueError(f"text_only_fraction must be in [0, 1], got {text_only_fraction}.")
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}.")
        self.task, self.size, self.seed, self.image_size = task, size, seed, image_size
        self.text_only_fraction, self.max_images = text_only_fraction, max_images

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} examples")
        rng = random.Random(self.seed * 1_000_003 + index)
        if rng.random() < self.text_only_fraction:
            prompt, answer = _text_only(rng)
            return {"images": [], "messages": _chat(prompt, answer, 0), "answer": answer, "task": "text_only"}
        count = rng.randint(1, self.max_images)
        images, prompts, answers = [], [], []
        for _ in range(count):
            image, prompt, answer = self._one_image(rng)
            images.append(image)
            prompts.append(prompt)
            answers.append(answer)
        prompt = prompts[0] if count == 1 else MULTI_IMAGE_PROMPTS.get(self.task) or " ".join(prompts)
        answer = " and ".join(answers)
        return {"images": images, "messages": _chat(prompt, answer, count), "answer": answer, "task": self.task}

    def to_hf_dataset(self) -> Any:
        """The same examples as a ``datasets.Dataset`` (what TRL's ``SFTTrainer`` requires); images stay PIL."""
        from datasets import Dataset as HFDataset

        return HFDataset.from_list([self[i] for i in range(len(self))])

    def _one_image(self, rng: random.Random) -> tuple[Image.Image, str, str]:
        side = self.image_size
        if self.task == "ocr":
            number = str(rng.randint(0, 9))  # one digit: two were beyond what these tiny towers learn
            return render_number(number, rng, side), PROMPTS["ocr"], number
        scene = random_scene(rng, side)
        if self.task == "vqa":
            question, answer = _vqa_question(scene, rng)
            return render_scene(scene, side), question, answer
        shifted = self.task == "domain_adaptation"
        return render_scene(scene, side, colour_shift=shifted), PROMPTS[self.task], scene.caption


def tokenizer_corpus() -> Iterator[str]:
    """Every kind of text the synthetic tasks produce, for training a tokenizer that covers them in few tokens."""
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                yield f"a {colour} {shape} on a {background} background"
                yield f"What colour is the {shape}? {colour}"
    yield from PROMPTS.values()
    yield from MULTI_IMAGE_PROMPTS.values()
    yield "What shape is in the image? What colour is the background?"
    for a in range(10):
        yield " ".join(f"What is {a} plus {b}? {a + b}" for b in range(10))
    yield " ".join(str(n) for n in range(100))
    yield "Repeat: " + " ".join(ANSWER_WORDS)
    yield "user assistant system model User Assistant USER ASSISTANT and the of to is in it you that"
