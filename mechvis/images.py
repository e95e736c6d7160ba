"""Images in: loading an image and encoding it with a prompt through the model's own processor,
and the grid of image tokens that processor laid out."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

from mechvis._validation import check_bool
from mechvis.errors import InvalidArgumentError
from mechvis.text import chat_content_spans, check_prompt, decode_tokens, merge_spans, token_kinds, validate_messages
from mechvis.types import Encoded, ImageGrid, Prompt, Segments

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



def load_image(image: object) -> Image.Image:
    """An RGB PIL image from a PIL image, an (H, W, 3) array (uint8, or floats in [0, 1]) or a path."""

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

    chat = check_bool(chat, "chat")
    check_prompt(prompt, chat)
    if not getattr(model.cfg, "is_multimodal", False):
        raise InvalidArgumentError(f"{model.cfg.model_name} is a text-only model; it takes no image. Drop image=.")
    processor = getattr(model, "processor", None)
    if processor is None:
        raise InvalidArgumentError("This vision-language model has no processor; pass processor= to load_model.")
    picture = load_image(image)
    placeholder = processor.image_token
    if chat:
        messages = validate_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
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
    segments = Segments(merge_spans(kinds), (0,), grid)
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
    return token_kinds(expanded, labelled, default)


def with_text_appended(extra: dict, n_tokens: int) -> dict:
    """Image inputs for the sequence extended by `n_tokens` text tokens (Qwen-VL's
    `mm_token_type_ids` marks each token's modality and must cover them)."""
    if "mm_token_type_ids" not in extra:
        return extra
    return {**extra, "mm_token_type_ids": torch.nn.functional.pad(extra["mm_token_type_ids"], (0, n_tokens))}
