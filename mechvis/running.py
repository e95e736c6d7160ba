"""`run`: one forward pass of a hooked model over a prompt, with token spans (segments).

Tokenisation follows the model's own tokenizer (`model.hf_tokenizer`, kept by `load_model`), so
the tokens are exactly what the model's HF pipeline would feed it; chat mode renders the model's
chat template with the generation prompt appended.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Span:
    """Token positions `start <= p < stop` of one part of the input.

    `kind` is one of: "bos", "image" (image tokens), "text" (completion prompt), "system", "user", "assistant"
    (a chat message's content), "template" (chat-template markup), "special" (other special
    tokens the tokenizer added), "generated".
    """

    kind: str
    start: int
    stop: int

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ImageGrid:
    """Image tokens as a rows × cols grid: `positions[r * cols + c]` is the token position of cell
    (r, c) (row-major, in LLM tokens after any patch merge of `merge_size` × `merge_size`)."""

    rows: int
    cols: int
    positions: tuple[int, ...]
    merge_size: int = 1

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or len(self.positions) != self.rows * self.cols:
            raise InvalidArgumentError(
                f"An image grid of {self.rows} × {self.cols} needs {self.rows * self.cols} token positions; "
                f"got {len(self.positions)}."
            )

    @property
    def coordinates(self) -> "Tensor":
        """(row, col) of every cell, row-major, as float64."""
        rows, cols = torch.meshgrid(torch.arange(self.rows), torch.arange(self.cols), indexing="ij")
        return torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()


@dataclass(frozen=True)
class Segments:
    """The parts of a token sequence, in order, covering every position exactly once.

    `sink_positions` are the positions reported separately from attention summaries: the first
    token, which every causal query can see and where heads park unused attention.
    """

    spans: tuple[Span, ...]
    sink_positions: tuple[int, ...]
    image_grid: ImageGrid | None = None  # None without an image, or for a layout not mapped yet

    def of_kind(self, kind: str) -> tuple[Span, ...]:
        return tuple(span for span in self.spans if span.kind == kind)

    def positions(self, kind: str) -> list[int]:
        """All token positions of the spans of `kind`, ascending."""
        return [position for span in self.of_kind(kind) for position in span.positions]

    def kind_at(self, position: int) -> str:
        for span in self.spans:
            if span.start <= position < span.stop:
                return span.kind
        raise InvalidArgumentError(f"position {position} is outside the sequence.")


@dataclass
class Encoded:
    """A prompt as tokens. `text` is the tokens decoded whole, `offsets` each token's characters in
    it and `str_tokens` the text each token completes (`decode_tokens`); segments come from the
    tokenizer's offsets in the input text and, in chat mode, the template's structure."""

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    segments: Segments
    str_tokens: list[str]


@dataclass
class Run:
    """What one forward pass produced.

    `tokens` and `logits` have no batch dimension; `cache` is transformer-lens'
    `ActivationCache` with its usual batch dimension of size 1. `text` is the whole token
    sequence decoded at once (`tokenizer.decode(tokens)`, special tokens included), `offsets[i]`
    the characters of `text` that hold token i's bytes and `str_tokens[i]` the characters token i
    completes (empty for a token that ends inside a character); see `decode_tokens`. `logits` are the bridge's:
    centred by compatibility mode (logit − mean logit over the vocabulary at each position, so
    every log-probability equals the model's); the model's own logits are
    `logits + mechvis.unembedding.centring_offset(model, cache["unembed.hook_in"][0])[:, None]`.
    """

    text: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    offsets: list[tuple[int, int]]
    logits: Float[Tensor, "pos vocab"]
    cache: "ActivationCache"
    segments: Segments

    def __repr__(self) -> str:
        grid = self.segments.image_grid
        image = f", image grid {grid.rows}×{grid.cols}" if grid is not None else ""
        return f"Run({len(self.tokens)} tokens, text={text_preview(self.text)}, cache {cache_summary(self.cache)}{image})"


def text_preview(text: str, limit: int = 60) -> str:
    """`text` quoted, cut in the middle with "…" beyond `limit` characters (for reprs)."""
    shown = text if len(text) <= limit else text[: limit // 2] + "…" + text[-(limit // 2 - 1):]
    return repr(shown)


def cache_summary(cache: object) -> str:
    """"N activations, X MB" of an ActivationCache (or any mapping of tensors), for reprs."""
    values = list(getattr(cache, "cache_dict", cache).values()) if hasattr(cache, "cache_dict") or isinstance(cache, dict) else []
    size = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return f"{len(values)} activations, {size / 2**20:.1f} MB"


def _token_kinds(
    offsets: Sequence[tuple[int, int]], labelled: Sequence[tuple[str, int, int]], default: str
) -> list[str]:
    """The kind of each token: the labelled character range it overlaps, else `default`."""
    kinds = [default] * len(offsets)
    for kind, char_start, char_stop in labelled:
        for index, (token_start, token_stop) in enumerate(offsets):
            if token_start < char_stop and token_stop > char_start:
                kinds[index] = kind
    return kinds


def _merge_spans(kinds: Sequence[str]) -> tuple[Span, ...]:
    """Consecutive positions of the same kind as one span."""
    spans: list[Span] = []
    for index, kind in enumerate(kinds):
        if spans and spans[-1].kind == kind:
            spans[-1] = Span(kind, spans[-1].start, index + 1)
        else:
            spans.append(Span(kind, index, index + 1))
    return tuple(spans)


def _validate_messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise InvalidArgumentError("The chat has no messages; pass at least one user message.")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise InvalidArgumentError(
                f"Message {index} must be a dict with 'role' in {CHAT_ROLES} and a 'content' string; "
                f"got {message!r}."
            )
        if not isinstance(message.get("content"), str):
            raise InvalidArgumentError(f"Message {index} has no 'content' string.")
        _check_text(message["content"], f"Message {index}")
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(message["content"].strip() for message in checked):
        raise InvalidArgumentError("Every message of the chat is empty; give the model some text.")
    return checked


_SENTINEL = re.compile("\ue000([0-9]+)\ue001")  # private-use characters around a message index
# How templates write a content: as given, or trimmed (Jinja's `trim`, e.g. Llama 3 and Gemma).
_CONTENT_FORMS: tuple[Callable[[str], str], ...] = (lambda c: c, str.strip, str.rstrip, str.lstrip)


def chat_content_spans(
    render: Callable[[list[str]], str], messages: Sequence[Message]
) -> tuple[str, list[tuple[str, int, int]]]:
    """The rendered chat and the character span of each message's content in it, from the
    template's structure, never from searching for the content's text.

    `render(contents)` renders the chat with message i's content replaced by `contents[i]`. The
    chat is rendered once as given and once with every non-empty content replaced by a sentinel
    (private-use characters around its index) that no template writes, so the sentinel rendering
    is the template's markup with a marked slot wherever a content goes (a content may appear
    once, several times, merged into another turn as Gemma does with the system message, or not
    at all). The real rendering is then matched against that markup: each slot holds the
    content as given or trimmed (`str.strip` / `rstrip` / `lstrip`, as Jinja's `trim` does), and
    the markup between slots must match exactly, so a content equal to a role name, a markup
    piece or another message is located where the template put it. A template whose markup
    depends on the contents themselves (so no such match exists) gets no content spans, with a
    warning: every token is then labelled "template" rather than guessed.

    Returns (rendered text, [(role, start, stop), ...]) with character positions in the text.
    """
    contents = [m["content"] for m in messages]
    text = render(contents)
    marked = render([f"\ue000{i}\ue001" if content else content for i, content in enumerate(contents)])
    parts = _SENTINEL.split(marked)  # markup at even indices, message indices at odd ones
    markup = parts[0::2]

    def match() -> list[tuple[int, int, int]] | None:
        """Depth-first over each slot's forms: [(message index, start, stop), ...] or None."""
        frames: list[list] = []  # per slot entered: [slot, where its content starts, forms, form tried]
        slot, cursor = 0, 0
        while True:
            if text.startswith(markup[slot], cursor):
                cursor += len(markup[slot])
                if slot == len(markup) - 1:
                    if cursor == len(text):
                        return [(int(parts[2 * f[0] + 1]), f[1], f[1] + len(f[2][f[3]])) for f in frames]
                else:
                    content = contents[int(parts[2 * slot + 1])]
                    frames.append([slot, cursor, list(dict.fromkeys(form(content) for form in _CONTENT_FORMS)), -1])
            while frames:  # the next form of the innermost slot that has one left
                frame = frames[-1]
                frame[3] += 1
                if frame[3] == len(frame[2]):
                    frames.pop()
                elif text.startswith(frame[2][frame[3]], frame[1]):
                    slot, cursor = frame[0] + 1, frame[1] + len(frame[2][frame[3]])
                    break
            else:
                return None

    slots = None
    if not any("\ue000" in piece or "\ue001" in piece for piece in markup):
        slots = match()
    if slots is None:
        warnings.warn(
            "The chat template's markup depends on the message contents, so mechvis cannot locate "
            "them in the rendered chat; every token is labelled 'template'.",
            stacklevel=3,
        )
        return text, []
    return text, [(messages[index]["role"], start, stop) for index, start, stop in slots if stop > start]


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenised, as the end of a sentence, or None. Python strings may hold
    lone surrogates (bytes decoded with errors="surrogateescape", as command-line arguments are,
    or a JSON escape such as \\ud800) that are not Unicode text: tokenizers refuse them with an
    unrelated TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds {text[error.start]!r} at character {error.start}, a lone surrogate that is not Unicode text "
                f"(bytes that are not UTF-8, or a broken \\ud800-style escape); pass valid UTF-8 text")
    return None


def _check_text(text: str, what: str) -> None:
    problem = text_problem(text)
    if problem:
        raise InvalidArgumentError(f"{what} {problem}.")


def _check_prompt(prompt: object, chat: bool) -> None:
    """A prompt is a string or (chat mode) a list of messages; anything else is named."""
    if isinstance(prompt, str):
        _check_text(prompt, "The prompt")
        return
    if chat and isinstance(prompt, (list, tuple)):
        return
    from mechvis.analysis._checks import shown

    if isinstance(prompt, (list, tuple)):
        raise InvalidArgumentError("A list of messages needs chat=True; completion mode takes a string.")
    raise InvalidArgumentError(
        "A prompt is a string, or (with chat=True) a list of {'role', 'content'} messages; "
        f"got {shown(prompt)}."
    )


def encode(
    model: "TransformerBridge", prompt: Prompt, *, chat: bool = False, prepend_bos: bool | None = None
) -> Encoded:
    """Tokenise `prompt` as the model's own pipeline does, with segments.

    Args:
        prompt: a string, or (with `chat=True`) a list of {"role", "content"} messages; a string
            with `chat=True` becomes one user message.
        chat: render the model's chat template, ending with the assistant's generation prompt.
        prepend_bos: completion mode only; None follows the tokenizer (SmolLM2 adds none),
            True/False force a BOS token at position 0 or not.
    """
    from mechvis.analysis._checks import check_bool

    chat = check_bool(chat, "chat")
    if prepend_bos is not None:
        prepend_bos = check_bool(prepend_bos, "prepend_bos")
    _check_prompt(prompt, chat)
    tokenizer = model.hf_tokenizer
    if chat:
        if prepend_bos is not None:
            raise InvalidArgumentError("prepend_bos applies to completion mode; the chat template decides in chat mode.")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError(
                "This model's tokenizer has no chat template; use chat=False (completion mode)."
            )
        messages = _validate_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

        def render(contents: list[str]) -> str:
            chat_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
            return tokenizer.apply_chat_template(chat_messages, tokenize=False, add_generation_prompt=True)

        text, labelled = chat_content_spans(render, messages)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        default_kind = "template"
    else:
        if not isinstance(prompt, str):
            raise InvalidArgumentError("A list of messages needs chat=True; completion mode takes a string.")
        if not prompt.strip():
            raise InvalidArgumentError("The prompt is empty; give the model some text.")
        text = prompt
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        labelled = [("text", 0, len(text))]
        default_kind = "special"
    token_ids: list[int] = list(encoding["input_ids"])
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
    bos_id = tokenizer.bos_token_id
    if not chat and prepend_bos is not None and bos_id is not None:
        has_bos = bool(token_ids) and token_ids[0] == bos_id
        if prepend_bos and not has_bos:
            token_ids, offsets = [bos_id, *token_ids], [(0, 0), *offsets]
        elif not prepend_bos and has_bos:
            token_ids, offsets = token_ids[1:], offsets[1:]
    kinds = _token_kinds(offsets, labelled, default_kind)
    if token_ids and token_ids[0] == bos_id:
        kinds[0] = "bos"
    n_ctx = model.cfg.n_ctx
    if len(token_ids) > n_ctx:
        raise InvalidArgumentError(
            f"The prompt is {len(token_ids)} tokens long; this model's context holds {n_ctx}. Shorten it."
        )
    decoded = decode_tokens(tokenizer, token_ids)
    return Encoded(decoded.text, token_ids, decoded.offsets, Segments(_merge_spans(kinds), (0,)), decoded.str_tokens)


def load_image(image: object) -> "PIL.Image.Image":
    """An RGB PIL image from a PIL image, an (H, W, 3) array (uint8, or floats in [0, 1]) or a path."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise InvalidArgumentError(f"An image array must be (height, width, 3); got shape {image.shape}.")
        pixels = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(pixels[..., :3])
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise InvalidArgumentError(f"Could not read the image {os.fspath(image)!r}: {error}. Pass a PNG/JPEG file, a PIL image or an array.") from error
    raise InvalidArgumentError(f"An image is a PIL image, an (H, W, 3) array or a file path; got {type(image).__name__}.")


def _image_grid(model: "TransformerBridge", positions: list[int], extra: dict) -> ImageGrid | None:
    """The LLM token grid of one image: Qwen-VL's (t, h, w) patch grid merged by the merge size;
    LLaVA's square grid of one token per vision patch; LLaVA-OneVision's high-resolution tiled
    grid; None for layouts not mapped."""
    if "image_grid_thw" in extra:
        merge = getattr(getattr(model.original_model.config, "vision_config", None), "spatial_merge_size", 2)
        _, height, width = (int(v) for v in extra["image_grid_thw"][0])
        return ImageGrid(height // merge, width // merge, tuple(positions), merge)
    if "image_sizes" in extra:
        return _tiled_grid(model, positions, [int(v) for v in extra["image_sizes"][0]])
    side = int(round(len(positions) ** 0.5))
    if side * side != len(positions):
        return None
    return ImageGrid(side, side, tuple(positions))


def _tiled_grid(model: "TransformerBridge", positions: list[int], image_size: list[int]) -> ImageGrid | None:
    """LLaVA-OneVision's anyres layout: a base (overview) image of side × side tokens, then the
    tiles' joint grid, unpadded to the image's aspect ratio and shrunk to the anyres_max budget as
    the model packs it, with a row-end token after each row. The grid is that high-resolution
    part (base and row-end tokens are not cells); None if the counts do not match this layout."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    config = model.original_model.config
    vision = getattr(config, "vision_config", None)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if vision is None or not pinpoints:
        return None
    side = vision.image_size // vision.patch_size
    tiles_high, tiles_wide = get_anyres_image_grid_shape(image_size, pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, tiles_high * side, tiles_wide * side), torch.tensor(image_size)).shape[1:]
    budget = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
    ratio = math.sqrt(rows * cols / (budget * side**2))
    if ratio > 1.1:  # the model interpolates the grid down to its budget
        rows, cols = int(rows // ratio), int(cols // ratio)
    base = side * side
    if rows < 1 or cols < 1 or base + rows * (cols + 1) != len(positions):
        return None
    cells = [positions[base + row * (cols + 1) + col] for row in range(rows) for col in range(cols)]
    return ImageGrid(rows, cols, tuple(cells))


def _image_markup(model: "TransformerBridge", placeholder: str) -> str:
    """The text placed before a completion prompt for its image: the placeholder, inside the
    model's vision start/end markers where it has them (Qwen-VL), as its chat template writes it."""
    config = model.original_model.config
    start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
    if start is None or end is None:
        return placeholder
    markers = model.hf_tokenizer.convert_ids_to_tokens([start, end])
    return f"{markers[0]}{placeholder}{markers[1]}"


def encode_with_image(model: "TransformerBridge", prompt: Prompt, image: object, *, chat: bool = False) -> tuple[Encoded, dict]:
    """Tokenise `prompt` with one image through the model's processor. Returns the encoding (its
    segments hold the image span and grid) and the extra forward inputs (pixel_values, ...) on the
    model's device."""
    from mechvis.analysis._checks import check_bool

    chat = check_bool(chat, "chat")
    _check_prompt(prompt, chat)
    if not getattr(model.cfg, "is_multimodal", False):
        raise InvalidArgumentError(f"{model.cfg.model_name} is a text-only model; it takes no image. Drop image=.")
    processor = getattr(model, "processor", None)
    if processor is None:
        raise InvalidArgumentError("This vision-language model has no processor; pass processor= to load_model.")
    picture = load_image(image)
    placeholder = processor.image_token
    if chat:
        messages = _validate_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")

        def render(contents: list[str]) -> str:
            parts = [[{"type": "text", "text": content}] for content in contents]
            parts[first_user].insert(0, {"type": "image"})
            chat_messages = [{"role": m["role"], "content": p} for m, p in zip(messages, parts)]
            return processor.apply_chat_template(chat_messages, add_generation_prompt=True, tokenize=False)

        try:
            text, labelled = chat_content_spans(render, messages)
        except Exception as error:  # noqa: BLE001 - templates fail in many ways
            raise InvalidArgumentError(
                f"The processor's chat template does not take images ({error}); use chat=False with "
                f"{placeholder!r} in the prompt."
            ) from error
    else:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgumentError("The prompt is empty; give the model some text.")
        text = prompt if placeholder in prompt else f"{_image_markup(model, placeholder)}\n{prompt}"
        labelled = [("text", 0, len(text))]
    if text.count(placeholder) != 1:
        raise InvalidArgumentError(f"The prompt must hold exactly one {placeholder!r} for the one image.")
    inputs = processor(text=text, images=picture, return_tensors="pt")
    token_ids = inputs["input_ids"][0].tolist()
    device = model.cfg.device
    extra = {
        key: value.to(device) if hasattr(value, "to") else value
        for key, value in inputs.items()
        if key not in ("input_ids", "attention_mask")
    }
    image_id = processor.image_token_id
    image_positions = [p for p, t in enumerate(token_ids) if t == image_id]
    if len(token_ids) > model.cfg.n_ctx:
        raise InvalidArgumentError(f"Prompt and image are {len(token_ids)} tokens; this model's context holds {model.cfg.n_ctx}.")
    kinds = _image_text_kinds(model.hf_tokenizer, text, token_ids, image_id, labelled, "template" if chat else "text")
    kinds = ["image" if t == image_id else kind for t, kind in zip(token_ids, kinds)]
    if token_ids and token_ids[0] == model.hf_tokenizer.bos_token_id:
        kinds[0] = "bos"
    grid = _image_grid(model, image_positions, extra)
    segments = Segments(_merge_spans(kinds), (0,), grid)
    decoded = decode_tokens(model.hf_tokenizer, token_ids)
    return Encoded(decoded.text, token_ids, decoded.offsets, segments, decoded.str_tokens), extra


def _image_text_kinds(
    tokenizer: object, text: str, token_ids: list[int], image_id: int, labelled: Sequence[tuple[str, int, int]], default: str
) -> list[str]:
    """The kind of each token of the processor's sequence, from the character spans `labelled` in
    `text`: the processor's tokens are the tokenizer's tokens of `text` with the one image
    placeholder expanded into image tokens, so the text tokens before and after it take the
    tokenizer's offsets. A processor that changes anything else leaves every token `default`."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]
    if ids.count(image_id) != 1:
        return [default] * len(token_ids)
    at, after = ids.index(image_id), len(ids) - ids.index(image_id) - 1
    n_image = len(token_ids) - len(ids) + 1
    if n_image < 1 or token_ids[:at] != ids[:at] or token_ids[len(token_ids) - after :] != ids[at + 1 :] or any(
        t != image_id for t in token_ids[at : at + n_image]
    ):
        return [default] * len(token_ids)
    expanded = offsets[:at] + [offsets[at]] * n_image + offsets[at + 1 :]
    return _token_kinds(expanded, labelled, default)


def with_text_appended(extra: dict, n_tokens: int) -> dict:
    """Image inputs for the sequence extended by `n_tokens` text tokens (Qwen-VL's
    `mm_token_type_ids` marks each token's modality and must cover them)."""
    if "mm_token_type_ids" not in extra:
        return extra
    return {**extra, "mm_token_type_ids": torch.nn.functional.pad(extra["mm_token_type_ids"], (0, n_tokens))}


@dataclass(frozen=True)
class DecodedTokens:
    """A token sequence decoded as a whole (see `decode_tokens`)."""

    text: str
    offsets: list[tuple[int, int]]
    str_tokens: list[str]


_PREFIX_BATCH = 256  # prefixes decoded per call by the exact path (bounds memory)
_WINDOW = 16  # tokens of context each windowed decode carries at least


def _common_prefix_length(text: str, other: str, at: int = 0) -> int:
    """The longest m with text[at : at + m] == other[:m], by bisection on C-speed comparisons."""
    low, high = 0, min(len(text) - at, len(other))
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(other[:middle], at):
            low = middle
        else:
            high = middle - 1
    return low


def _prefix_ends(tokenizer: object, ids: list[int], text: str) -> list[tuple[int, bool]]:
    """For each token i: (c_i, whether it ends inside a character), by decoding every prefix
    (the definition; quadratic in the length)."""
    ends = []
    for first in range(0, len(ids), _PREFIX_BATCH):
        prefixes = tokenizer.batch_decode(
            [ids[: i + 1] for i in range(first, min(len(ids), first + _PREFIX_BATCH))], skip_special_tokens=False
        )
        for prefix in prefixes:
            agrees = text.startswith(prefix)
            ends.append((len(prefix), False) if agrees else (_common_prefix_length(text, prefix), True))
    return ends


def _windowed_ends(tokenizer: object, ids: list[int], text: str) -> list[tuple[int, bool]] | None:
    """The same as `_prefix_ends` in linear time, or None where it cannot vouch for that.

    Each token is decoded with the tokens since a window start (as incremental detokenisers in
    TGI and vLLM do), between `_WINDOW` and 2 × `_WINDOW` tokens back, at a token that begins a
    character. The window's text before the anchor (its first decode, which covers tokens
    already placed) is set aside, so a decoder's effect at the window's start, like SentencePiece
    dropping a leading space, cancels; the rest is compared with `text` from the anchor exactly
    as `_prefix_ends` compares a prefix. None, for the caller to use the definition, if a window
    changes the text set aside (e.g. a byte run that turns invalid) or does not end the text."""
    ends: list[tuple[int, bool]] = []
    start, given, anchor = 0, "", 0  # window start, its text set aside, where the rest goes in `text`
    for i in range(len(ids)):
        window = tokenizer.decode(ids[start : i + 1], skip_special_tokens=False)
        if not window.startswith(given):
            return None
        tail = window[len(given) :]
        if not text.startswith(tail, anchor):
            ends.append((anchor + _common_prefix_length(text, tail, anchor), True))
            continue
        ends.append((anchor + len(tail), False))
        if i + 1 - start > 2 * _WINDOW:  # move the window up to the earliest of the last _WINDOW tokens that begins a character
            restart = next((j for j in range(i + 1 - _WINDOW, i + 1) if not ends[j - 1][1]), None)
            if restart is not None:
                start, given, anchor = restart, tokenizer.decode(ids[restart : i + 1], skip_special_tokens=False), ends[-1][0]
    return ends if ends and ends[-1] == (len(text), False) else None


def decode_tokens(tokenizer: object, token_ids: Sequence[int], *, exact: bool = False) -> DecodedTokens:
    """The text of a token sequence decoded whole, with each token's characters in it.

    `text` is `tokenizer.decode(token_ids)`, special tokens included (nothing skipped): a
    character that several byte-level tokens spell (東, 🎉) is whole, never U+FFFD.

    Offsets come from decoding prefixes: the text completed after token i is the longest prefix of
    `text` that `decode(token_ids[:i + 1])` agrees with (and never shorter than after token
    i − 1), so its length c_i never depends on decoding a token alone. Rule for each token i
    (c_{-1} = 0):

    - `str_tokens[i] = text[c_{i-1}:c_i]`, the characters token i completes; they partition
      `text` (``"".join(str_tokens) == text``). A token that ends inside a character (the first
      bytes of 東) completes nothing: its string is "" and the token that completes the
      character carries it.
    - `offsets[i] = (c_{i-1}, c_i)`, extended by one character when the token ends inside a
      character (its prefix decodes to something `text` does not start with): the span of whole
      characters that holds the token's bytes. Tokens sharing a character overlap on it, as the
      offsets of HF's fast tokenizers do, so a keyword search covers every token of the keyword.

    By default each token is decoded within a window of recent tokens (`_windowed_ends`, linear
    time), falling back to decoding every prefix (quadratic) when the windows cannot vouch for
    the same result; `exact=True` always decodes every prefix.
    """
    ids = [int(token) for token in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    ends = None if exact else _windowed_ends(tokenizer, ids, text)
    if ends is None:  # (characters of `text` completed, ends inside a character) for each token
        ends = _prefix_ends(tokenizer, ids, text)
    offsets, pieces, completed = [], [], 0
    for length, inside in ends:
        stop = max(completed, length)
        offsets.append((completed, min(stop + 1, len(text)) if inside else stop))
        pieces.append(text[completed:stop])
        completed = stop
    return DecodedTokens(text, offsets, pieces)


def str_tokens_of(model: "TransformerBridge", token_ids: Sequence[int]) -> list[str]:
    """The text each token of a SEQUENCE completes, from decoding it whole (`decode_tokens`).
    Vocabulary entries out of any sequence (lens top tokens, embedding rows) use `vocabulary_strings`."""
    return decode_tokens(model.hf_tokenizer, token_ids).str_tokens


def vocabulary_strings(model: "TransformerBridge", token_ids: Sequence[int]) -> list[str]:
    """Each vocabulary entry decoded on its own (e.g. ' Paris'), for tokens shown outside any
    sequence; a byte-level token that is part of a character decodes to U+FFFD."""
    return model.hf_tokenizer.batch_decode([[token] for token in token_ids])


def run(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    chat: bool = False,
    image: object | None = None,
    prepend_bos: bool | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
) -> Run:
    """Run the model once over `prompt` (and `image`) and cache its activations.

    Args:
        prompt, chat, prepend_bos: as in `encode`.
        image: for a vision-language model, a PIL image, an (H, W, 3) array or a file path; the
            model's processor places it (completion prompts may hold its placeholder, e.g.
            "<image>", else it goes first). The run's segments then hold an "image" span and
            `image_grid`.
        names_filter: which hooks to cache (transformer-lens `names_filter`); None caches all.
            Attention patterns cost layers × heads × pos² floats: filter for long prompts.
    """
    from mechvis.analysis._checks import check_bool, check_names_filter

    chat = check_bool(chat, "chat")
    _check_prompt(prompt, chat)
    names_filter = check_names_filter(model, names_filter)
    extra: dict = {}
    if image is not None:
        encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    else:
        processor = getattr(model, "processor", None)
        placeholder = getattr(processor, "image_token", None)
        texts = [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt if isinstance(m, dict)]
        if placeholder and any(isinstance(t, str) and placeholder in t for t in texts):
            raise InvalidArgumentError(f"The prompt holds the image placeholder {placeholder!r} but no image was given; pass image=.")
        encoded = encode(model, prompt, chat=chat, prepend_bos=prepend_bos)
    device = model.cfg.device
    tokens = torch.tensor(encoded.token_ids, dtype=torch.long, device=device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names_filter, **extra)
    return Run(
        text=encoded.text,
        tokens=tokens,
        str_tokens=encoded.str_tokens,
        offsets=encoded.offsets,
        logits=logits[0],
        cache=cache,
        segments=encoded.segments,
    )
