"""Load your own image-text data into the collator's ``{"images", "messages"}`` rows, without glue code.

Three formats cover most published VLM data, and each is detected from the rows' keys (or named with ``format=``):

- ``"messages"``: chat messages as processors and TRL take them, whose image parts are ``{"type": "image"}`` (the
  row's ``images`` / ``image`` field gives the image), ``{"type": "image", "image": path | PIL.Image}`` or
  ``{"type": "image_url", "image_url": {"url": path}}``;
- ``"sharegpt"``: LLaVA/ShareGPT ``conversations`` (``from``/``value``) with ``<image>`` markers in the text and an
  ``image`` or ``images`` field;
- ``"flat"``: one image (or a list), a question and an answer per row; ``columns=`` maps other column names.

Every row is checked when the data is loaded (image files exist, image markers match the images, roles are known),
so a mistake is reported with its row number and field before training starts; the images themselves are only
opened when a row is read (a ``datasets.Image`` column holding paths), so a large dataset costs no memory up front.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CHAT_FORMATS", "ChatDataError", "load_chat_dataset"]

CHAT_FORMATS = ("messages", "sharegpt", "flat")
IMAGE_MARKER = "<image>"
_FILE_READERS = (".jsonl", ".json", ".csv", ".parquet")
# canonical flat column -> the names it is found under when columns= does not say
_FLAT_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "images", "image_path", "image_paths", "file_name", "file_names", "img", "path"),
    "question": ("question", "prompt", "instruction", "query", "input", "text"),
    "answer": ("answer", "response", "output", "caption", "completion", "label"),
    "system": ("system",),
}
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


class ChatDataError(ValueError):
    """A row of user data that cannot become a training example; ``row`` and ``field`` say where."""

    def __init__(self, row: int, field: str, problem: str, source: str = "") -> None:
        self.row, self.field, self.problem = row, field, problem
        where = f"{source} row {row}" if source else f"row {row}"
        super().__init__(f"{where}, field {field!r}: {problem}")


def load_chat_dataset(
    source: str | os.PathLike | Any,
    *,
    image_root: str | os.PathLike | None = None,
    columns: Mapping[str, str] | None = None,
    format: str | None = None,
    check_files: bool = True,
) -> Any:
    """A ``datasets.Dataset`` of ``{"images": [...], "messages": [...]}`` rows for :class:`VisionChatCollator`.

    Args:
        source: a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file; a folder in ``datasets``' imagefolder layout
            (``metadata.jsonl`` or ``metadata.csv`` beside the images, ``file_name`` naming each row's image); a
            ``datasets.Dataset``; or a list of dicts.
        image_root: folder that relative image paths are relative to (default: the data file's folder, or the
            current directory for in-memory data).
        columns: for the flat format, ``{"image": ..., "question": ..., "answer": ..., "system": ...}`` names of
            your columns (defaults: common names such as ``prompt``/``response``).
        format: ``"messages"``, ``"sharegpt"`` or ``"flat"``; detected from the first row when omitted.
        check_files: check that every image file exists while loading (a stat per image, no decoding).

    Rows may hold several images, none (text-only) and several turns. Images are decoded (as RGB) when a row is
    read. Raises :class:`ChatDataError` (a ``ValueError``) naming the row and field of the first bad row.
    """
    import datasets

    rows, base, name = _read_rows(source)
    root = Path(image_root) if image_root is not None else base
    if not rows:
        raise ValueError(f"{name or 'the data'} has no rows.")
    fmt = format or _detect_format(rows[0], columns, name)
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"format must be one of {CHAT_FORMATS}, got {fmt!r}.")
    if columns and fmt != "flat":
        raise ValueError(f"columns= maps flat-format columns; this data is in the {fmt!r} format.")
    images, messages = [], []
    for index, row in enumerate(rows):
        parse = _RowParser(index, name, root, check_files)
        row_messages = parse.row(row, fmt, dict(columns or {}))
        images.append(parse.images)
        messages.append(row_messages)
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image(mode="RGB")),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
        }
    )
    return datasets.Dataset.from_dict({"images": images, "messages": messages}, features=features)


# --------------------------------------------------------------------------------------------------------------------
# Reading


def _read_rows(source: Any) -> tuple[list[dict[str, Any]], Path, str]:
    """(rows, the folder relative image paths start from, a name for messages)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            for meta in ("metadata.jsonl", "metadata.csv", "metadata.parquet"):
                if (path / meta).is_file():
                    return _read_file(path / meta), path, str(path / meta)
            raise FileNotFoundError(
                f"{path} is a folder without metadata.jsonl/metadata.csv/metadata.parquet: an imagefolder dataset "
                "needs one, with a `file_name` column naming each row's image."
            )
        if not path.is_file():
            raise FileNotFoundError(f"No data file at {path}.")
        return _read_file(path), path.parent, str(path)
    if hasattr(source, "features") and hasattr(source, "cast_column"):  # a datasets.Dataset
        return _undecoded_rows(source), Path.cwd(), ""
    if isinstance(source, Iterable) and not isinstance(source, Mapping):
        return [dict(row) for row in source], Path.cwd(), ""
    raise TypeError(
        f"load_chat_dataset takes a file, a folder, a datasets.Dataset or a list of rows; got {type(source).__name__}."
    )


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line_number} (row {len(rows)}) is not valid JSON: {e}") from e
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: one list of rows inside
            lists = [value for value in data.values() if isinstance(value, list)]
            if len(lists) != 1:
                raise ValueError(f"{path} holds an object; expected a list of rows (or an object with one list).")
            data = lists[0]
        return list(data)
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"Cannot read {path}: supported data files are {', '.join(_FILE_READERS)}.")


def _undecoded_rows(dataset: Any) -> list[dict[str, Any]]:
    """The rows of a ``datasets.Dataset`` with image columns left undecoded (``{"bytes", "path"}``)."""
    import datasets

    def undecoded(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, (datasets.List, datasets.LargeList)):
            return type(feature)(undecoded(feature.feature))
        if isinstance(feature, dict):
            return {key: undecoded(value) for key, value in feature.items()}
        return feature

    features = datasets.Features({key: undecoded(value) for key, value in dataset.features.items()})
    if features != dataset.features:
        dataset = dataset.cast(features)
    return list(dataset.with_format(None))


def _detect_format(row: dict[str, Any], columns: Mapping[str, str] | None, name: str) -> str:
    if columns:
        return "flat"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        turns = row["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages"
        return "sharegpt"
    if any(key in row for key in _FLAT_ALIASES["answer"]):
        return "flat"
    raise ChatDataError(
        0,
        "(columns)",
        f"unknown format: the row has columns {sorted(row)}. Expected `messages` (chat), `conversations` "
        "(LLaVA/ShareGPT) or an answer column (flat: image, question, answer; map other names with "
        'columns={"image": ..., "question": ..., "answer": ...}).',
        name,
    )


# --------------------------------------------------------------------------------------------------------------------
# Parsing one row


class _RowParser:
    """Turns one row into normalized messages, collecting its images (paths, PIL images or encoded bytes)."""

    def __init__(self, index: int, source: str, root: Path, check_files: bool) -> None:
        self.index, self.source, self.root, self.check_files = index, source, root, check_files
        self.images: list[Any] = []

    def error(self, field: str, problem: str) -> ChatDataError:
        return ChatDataError(self.index, field, problem, self.source)

    def row(self, row: dict[str, Any], fmt: str, columns: dict[str, str]) -> list[dict[str, Any]]:
        if not isinstance(row, dict):
            raise self.error("(row)", f"expected an object, got {type(row).__name__}")
        if fmt == "messages":
            messages = self._messages(row)
        elif fmt == "sharegpt":
            messages = self._sharegpt(row)
        else:
            messages = self._flat(row, columns)
        if not messages or messages[-1]["role"] != "assistant":
            raise self.error(
                "messages" if fmt != "flat" else "answer", "the conversation must end with an assistant turn"
            )
        return messages

    # -- formats --------------------------------------------------------------------------------------------------

    def _messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        key = "messages" if "messages" in row else "conversations"
        turns = row.get(key)
        if not isinstance(turns, list):
            raise self.error(key, f"expected a list of messages, got {type(turns).__name__}")
        field_images, images_field = self._field_images(row)
        pending = list(field_images)
        messages = []
        for t, turn in enumerate(turns):
            where = f"{key}[{t}]"
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise self.error(where, 'each message needs "role" and "content"')
            content = turn["content"]
            if isinstance(content, str):  # "<image>\nWhat is it?" works here too
                parts = self._split_markers(content, pending, f"{where}.content")
            elif isinstance(content, list):
                parts = [self._part(part, pending, f"{where}.content[{p}]") for p, part in enumerate(content)]
            else:
                raise self.error(f"{where}.content", f"expected a string or a list of parts, got {content!r}")
            messages.append({"role": self._role(turn["role"], f"{where}.role"), "content": parts})
        if pending:
            used = len(field_images) - len(pending)
            raise self.error(
                images_field,
                f"{len(field_images)} images but only {used} image parts in the messages: add one "
                '{"type": "image"} part per image, in order',
            )
        return messages

    def _sharegpt(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise self.error("conversations", f"expected a list of turns, got {type(turns).__name__}")
        field_images, images_field = self._field_images(row)
        pending = list(field_images)
        messages = []
        for t, turn in enumerate(turns):
            where = f"conversations[{t}]"
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise self.error(where, 'each ShareGPT turn needs "from" and "value"')
            parts = self._split_markers(str(turn["value"]), pending, f"{where}.value")
            messages.append({"role": self._role(turn["from"], f"{where}.from"), "content": parts})
        if pending:
            markers = len(field_images) - len(pending)
            raise self.error(
                images_field,
                f"{len(field_images)} images but {markers} {IMAGE_MARKER} markers in the conversation: put one "
                f"{IMAGE_MARKER} where each image goes",
            )
        return messages

    def _flat(self, row: dict[str, Any], columns: dict[str, str]) -> list[dict[str, Any]]:
        unknown = sorted(set(columns) - set(_FLAT_ALIASES))
        if unknown:
            raise ValueError(f"columns= keys must be among {sorted(_FLAT_ALIASES)}; got {unknown}.")
        names = {
            key: columns.get(key) or next((alias for alias in aliases if alias in row), None)
            for key, aliases in _FLAT_ALIASES.items()
        }
        for key in ("question", "answer"):
            if names[key] is None or names[key] not in row:
                wanted = columns.get(key) or " / ".join(_FLAT_ALIASES[key])
                raise self.error(
                    wanted, f"missing {key} column (row has {sorted(row)}); map yours with columns={{{key!r}: ...}}"
                )
        answer, question = row[names["answer"]], row[names["question"]]
        if answer is None or not str(answer).strip():
            raise self.error(names["answer"], "empty answer: nothing to train on")
        images = []
        if names["image"] is not None:
            value = row.get(names["image"])
            if isinstance(value, str) and value.strip().startswith("["):  # a JSON list in a CSV cell
                value = json.loads(value)
            values = value if isinstance(value, list) else [value]
            images = [self._image(v, names["image"]) for v in values if v not in (None, "")]
        self.images.extend(images)
        user = [{"type": "image", "text": None} for _ in images] + [_text(str(question or ""))]
        messages = []
        if names["system"] and row.get(names["system"]):
            messages.append({"role": "system", "content": [_text(str(row[names["system"]]))]})
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": [_text(str(answer))]}]

    # -- pieces -----------------------------------------------------------------------------------------------------

    def _role(self, role: Any, field: str) -> str:
        if role not in _ROLES:
            raise self.error(field, f"unknown role {role!r}; expected one of {sorted(_ROLES)}")
        return _ROLES[role]

    def _field_images(self, row: dict[str, Any]) -> tuple[list[Any], str]:
        """The images a row gives outside its messages, resolved (paths checked), and the field's name."""
        for key in ("images", "image"):
            if key in row and row[key] is not None:
                value = row[key]
                values = value if isinstance(value, list) else [value]
                return [
                    self._image(v, f"{key}[{i}]" if isinstance(value, list) else key) for i, v in enumerate(values)
                ], key
        return [], "images"

    def _part(self, part: Any, pending: list[Any], field: str) -> dict[str, Any]:
        if not isinstance(part, dict) or "type" not in part:
            raise self.error(field, f'expected a content part with a "type", got {part!r}')
        kind = part["type"]
        if kind == "text":
            return _text(str(part.get("text") or ""))
        if kind in ("image", "image_url"):
            payload = next((part[k] for k in ("image", "image_url", "url", "path") if part.get(k) is not None), None)
            if isinstance(payload, dict):  # {"type": "image_url", "image_url": {"url": ...}}
                payload = payload.get("url")
            if payload is not None:
                self.images.append(self._image(payload, field))
            elif pending:
                self.images.append(pending.pop(0))
            else:
                raise self.error(field, "image part without an image, and the row has no images left to give it")
            return {"type": "image", "text": None}
        raise self.error(field, f"unsupported content part type {kind!r}; use 'text', 'image' or 'image_url'")

    def _split_markers(self, text: str, pending: list[Any], field: str) -> list[dict[str, Any]]:
        """``"<image>\\nWhat is it?"`` -> an image part and a text part; each marker takes the next image."""
        parts: list[dict[str, Any]] = []
        for piece in re.split(f"({re.escape(IMAGE_MARKER)})", text):
            if piece == IMAGE_MARKER:
                if not pending:
                    raise self.error(field, f"more {IMAGE_MARKER} markers than the row has images")
                self.images.append(pending.pop(0))
                parts.append({"type": "image", "text": None})
            elif piece.strip():
                parts.append(_text(piece.strip("\n")))
        return parts or [_text("")]

    def _image(self, value: Any, field: str) -> Any:
        """A path (made absolute and checked), a PIL image, or ``{"bytes", "path"}``, as ``datasets.Image`` takes."""
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            if value.get("bytes") is not None:
                return {"bytes": value["bytes"], "path": value.get("path")}
            value = value.get("path")
        if hasattr(value, "save") and hasattr(value, "size"):  # PIL.Image
            return value
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise self.error(field, f"expected an image path or a PIL image, got {value!r}")
        text = str(value)
        if text.startswith(("http://", "https://")):
            raise self.error(
                field,
                f"image URL {text!r}: nothing is downloaded here; download the images and give local paths "
                "(relative paths are resolved against image_root)",
            )
        if text.startswith("data:"):  # data:image/png;base64,...
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise self.error(field, "only base64 data: URIs are supported")
            return {"bytes": base64.b64decode(payload), "path": None}
        text = text.removeprefix("file://")
        path = Path(text) if os.path.isabs(text) else self.root / text
        if self.check_files and not path.is_file():
            raise self.error(field, f"image file not found: {path} (relative paths start at image_root={self.root})")
        return str(path)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def open_image(value: Any) -> Any:
    """A PIL image from a path, bytes or ``{"bytes", "path"}`` (PIL images pass through), in RGB."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        value = Image.open(value)
    return value.convert("RGB") if value.mode != "RGB" else value
