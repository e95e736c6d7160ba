"""Sweep datasets: JSONL or Parquet, one item per line/row, validated completely before any model work.

An item (README, "Sweep dataset format"):

    {"id": "q1", "prompt": "The capital of France is", "target": " Paris", "condition": "plain", "pair": "p1"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "continuation": " Hello!"}
    {"id": "q3", "prompt": "Describe the photo.", "image": "photos/cat.png", "generate": {"max_new_tokens": 16}}

Errors are `DatasetError`s naming the 1-based line (JSONL) or row (Parquet) of the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from mechvis.errors import DatasetError, InvalidArgumentError
from mechvis.generation import SamplingSettings
from mechvis.text import decode_tokens, text_problem

FIELDS = ("id", "prompt", "messages", "chat", "image", "continuation", "generate", "condition", "pair", "target")
GENERATE_FIELDS = {"max_new_tokens": int, "temperature": (int, float), "top_k": int, "top_p": (int, float), "seed": int}


def _check_generate_settings(generate: dict, where: str) -> None:
    """The values `mechvis.generate` accepts, checked with the line number before any model work,
    by the validator `generate` itself runs (`SamplingSettings.validate`)."""

    if generate.get("max_new_tokens", 1) < 1:
        raise DatasetError(f"{where}: generate max_new_tokens must be a positive integer; got {generate['max_new_tokens']!r}.")
    settings = SamplingSettings(**{key: generate[key] for key in ("temperature", "top_k", "top_p", "seed") if key in generate})
    try:
        settings.validate()
    except InvalidArgumentError as error:
        raise DatasetError(f"{where}: generate {error}") from None


@dataclass(frozen=True)
class Item:
    """One validated dataset item. `image` is an absolute path; `line` the 1-based line or row."""

    id: str
    line: int
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    chat: bool = False
    image: str | None = None
    continuation: str | None = None
    generate: dict = field(default_factory=dict)  # empty: no generation
    condition: str | None = None
    pair: str | None = None
    target: str | None = None

    @property
    def model_prompt(self) -> "str | list[dict[str, str]]":
        """The prompt as `mechvis.run` takes it: a string or a list of {"role", "content"}."""
        if self.messages is not None:
            return [{"role": role, "content": content} for role, content in self.messages]
        return self.prompt

    @property
    def generates(self) -> bool:
        return bool(self.generate)

    def canonical(self) -> dict:
        """The item as plain JSON (without `line`), for hashing."""
        data = asdict(self)
        data.pop("line")
        return data


def _where(path: Path, line: int, kind: str) -> str:
    return f"{path.name}, {kind} {line}"


def _check_item(raw: object, line: int, where: str, base: Path) -> Item:
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: an item must be a JSON object; got {type(raw).__name__}.")
    raw = {key: value for key, value in raw.items() if value is not None}  # Parquet fills absent columns with null
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise DatasetError(f"{where}: unknown fields {unknown}; an item has {list(FIELDS)}.")
    if "id" not in raw:
        raise DatasetError(f"{where}: the item has no 'id'; give every item a unique id.")
    item_id = raw["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or (isinstance(item_id, str) and not item_id.strip()):
        raise DatasetError(f"{where}: 'id' must be a non-empty string or an integer; got {item_id!r}.")
    where = f"{where} (id {item_id!r})"
    has_prompt, has_messages = "prompt" in raw, "messages" in raw
    if has_prompt == has_messages:
        raise DatasetError(f"{where}: give exactly one of 'prompt' (a string) or 'messages' (a chat).")
    prompt = messages = None
    if has_prompt:
        prompt = raw["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string.")
    else:
        value = raw["messages"]
        if not isinstance(value, list) or not value:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
        pairs = []
        for index, message in enumerate(value):
            if (not isinstance(message, dict) or set(message) != {"role", "content"}
                    or not all(isinstance(message[k], str) for k in ("role", "content"))):
                raise DatasetError(f"{where}: message {index} must be {{'role': str, 'content': str}}; got {message!r}.")
            pairs.append((message["role"], message["content"]))
        messages = tuple(pairs)
    for name, text in ([("prompt", prompt)] if has_prompt else [(f"message {i}", c) for i, (_, c) in enumerate(messages)]) + [
            (name, raw[name]) for name in ("condition", "pair", "target", "continuation") if isinstance(raw.get(name), str)]:
        if text_problem(text):
            raise DatasetError(f"{where}: {name!r} {text_problem(text)}.")
    chat = raw.get("chat", has_messages)
    if not isinstance(chat, bool):
        raise DatasetError(f"{where}: 'chat' must be true or false.")
    if has_messages and not chat:
        raise DatasetError(f"{where}: 'messages' need the chat template; drop 'chat': false.")
    for name in ("condition", "pair", "target", "continuation"):
        if name in raw and (not isinstance(raw[name], str) or not raw[name]):
            raise DatasetError(f"{where}: {name!r} must be a non-empty string.")
    if "pair" in raw and "condition" not in raw:
        raise DatasetError(f"{where}: 'pair' groups items of different conditions; give the item a 'condition'.")
    generate = raw.get("generate", {})
    if generate is True:
        generate = {"max_new_tokens": 32}
    if not isinstance(generate, dict):
        raise DatasetError(f"{where}: 'generate' must be an object such as {{\"max_new_tokens\": 32}}.")
    generate = {key: value for key, value in generate.items() if value is not None}
    for key, value in generate.items():
        kind = GENERATE_FIELDS.get(key)
        if kind is None:
            raise DatasetError(f"{where}: unknown generate setting {key!r}; choose from {sorted(GENERATE_FIELDS)}.")
        if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
            raise DatasetError(f"{where}: generate setting {key!r} has a bad value {value!r}.")
    if generate:
        _check_generate_settings(generate, where)
        generate.setdefault("max_new_tokens", 32)
    if generate and "continuation" in raw:
        raise DatasetError(f"{where}: give 'continuation' (teacher-forced) or 'generate', not both.")
    if "image" in raw and "continuation" in raw:
        raise DatasetError(f"{where}: a teacher-forced 'continuation' with an 'image' is not supported; use 'generate'.")
    image = None
    if "image" in raw:
        if not isinstance(raw["image"], str) or not raw["image"]:
            raise DatasetError(f"{where}: 'image' must be a path (relative to the dataset file).")
        image_path = (base / raw["image"]).resolve()
        try:
            with Image.open(image_path) as opened:
                opened.verify()
        except Exception as error:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
            raise DatasetError(f"{where}: the image {raw['image']!r} cannot be read ({type(error).__name__}: {error}).") from None
        image = str(image_path)
    return Item(
        id=str(item_id), line=line, prompt=prompt, messages=messages, chat=chat, image=image,
        continuation=raw.get("continuation"), generate=dict(sorted(generate.items())),
        condition=raw.get("condition"), pair=raw.get("pair"), target=raw.get("target"),
    )


def _raw_items(path: Path) -> tuple[list[tuple[int, object]], str]:
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # noqa: BLE001
            raise DatasetError(f"{path.name}: not a readable Parquet file ({error}).") from None
        return list(enumerate(rows, start=1)), "row"
    raw = []
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        data = path.read_bytes()
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DatasetError(
            f"{_where(path, line, 'line')}: not UTF-8 text (byte {data[error.start]:#04x} at column {column}); "
            "a JSONL dataset is UTF-8 text, one JSON object per line."
        ) from None
    for number, text in enumerate(io.StringIO(content), start=1):
        if not text.strip():
            continue
        try:
            raw.append((number, json.loads(text)))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{_where(path, number, 'line')}: malformed JSON ({error.msg} at column {error.colno}).") from None
    return raw, "line"


def read_dataset(path: "str | Path") -> list[Item]:
    """Read and validate a `.jsonl` or `.parquet` dataset; image paths are relative to its folder.

    Raises:
        DatasetError: the file is missing, empty or of another kind, or an item is bad (malformed
            JSON, missing or duplicate id, no prompt, unknown field, unreadable image, ...); the
            message names the line (JSONL) or row (Parquet).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DatasetError(f"A dataset is the path of a .jsonl or .parquet file; got {type(path).__name__}. Write the "
                           f"items to a .jsonl file (one JSON object per line) first.")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"No dataset at {path}; give a .jsonl or .parquet file.")
    if path.suffix not in (".jsonl", ".parquet"):
        raise DatasetError(f"{path.name}: a dataset is a .jsonl or .parquet file; got {path.suffix or 'no suffix'!r}.")
    raw, kind = _raw_items(path)
    if not raw:
        raise DatasetError(f"{path.name}: the dataset holds no items.")
    items, seen = [], {}
    for number, value in raw:
        item = _check_item(value, number, _where(path, number, kind), path.parent)
        if item.id in seen:
            raise DatasetError(f"{_where(path, number, kind)}: duplicate id {item.id!r} (first on {kind} {seen[item.id]}).")
        seen[item.id] = number
        items.append(item)
    return items


def require(items: Sequence[Item], analysis: str, condition, message: str) -> None:
    """Raise a DatasetError naming the first item that fails `condition` for `analysis`."""
    for item in items:
        if not condition(item):
            raise DatasetError(f"line/row {item.line} (id {item.id!r}): the {analysis!r} analysis {message}")


def check_targets(items: Sequence[Item], tokenizer) -> None:
    """Every item's `target` must be one token for `tokenizer` (the model's own, which the sweep
    loads before the model to check this at plan time).

    Raises:
        DatasetError: naming the line/row, the target and the tokens it splits into."""
    for item in items:
        if item.target is None:
            continue
        ids = tokenizer.encode(item.target, add_special_tokens=False)
        if len(ids) != 1:
            pieces = decode_tokens(tokenizer, ids).str_tokens  # decoded whole: a character split into bytes is not U+FFFD
            raise DatasetError(
                f"line/row {item.line} (id {item.id!r}): 'target' {item.target!r} is {len(ids)} tokens {pieces} for this "
                "model, not one. Give a single token (mind the leading space: ' Paris' and 'Paris' differ)."
            )


def dataset_hash(items: Sequence[Item]) -> str:
    """SHA-256 over the items (canonical JSON) and the bytes of their images."""
    digest = hashlib.sha256()
    images: dict[str, str] = {}
    for item in items:
        digest.update(json.dumps({**item.canonical(), "image": None}, sort_keys=True).encode())
        if item.image is not None:
            if item.image not in images:
                images[item.image] = hashlib.sha256(Path(item.image).read_bytes()).hexdigest()
            digest.update(images[item.image].encode())
        digest.update(b"\n")
    return digest.hexdigest()
