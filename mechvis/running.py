"""`run`: one forward pass of a hooked model over a prompt, with token spans (segments)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis._deprecation import moved_names
from mechvis._validation import check_bool, check_model, check_names_filter
from mechvis.errors import InvalidArgumentError
from mechvis.images import encode_with_image
from mechvis.text import check_prompt, encode, text_preview
from mechvis.types import Prompt, Segments

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


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
    `logits + mechvis.models.unembedding.centring_offset(model, cache["unembed.hook_in"][0])[:, None]`.
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


def cache_summary(cache: object) -> str:
    """"N activations, X MB" of an ActivationCache (or any mapping of tensors), for reprs."""
    values = list(getattr(cache, "cache_dict", cache).values()) if hasattr(cache, "cache_dict") or isinstance(cache, dict) else []
    size = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return f"{len(values)} activations, {size / 2**20:.1f} MB"


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

    model = check_model(model)
    chat = check_bool(chat, "chat")
    check_prompt(prompt, chat)
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


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "CHAT_ROLES": "mechvis.types:CHAT_ROLES",
    "DecodedTokens": "mechvis.types:DecodedTokens",
    "Encoded": "mechvis.types:Encoded",
    "ImageGrid": "mechvis.types:ImageGrid",
    "Message": "mechvis.types:Message",
    "Span": "mechvis.types:Span",
    "chat_content_spans": "mechvis.text:chat_content_spans",
    "decode_tokens": "mechvis.text:decode_tokens",
    "load_image": "mechvis.images:load_image",
    "str_tokens_of": "mechvis.text:str_tokens_of",
    "text_problem": "mechvis.text:text_problem",
    "vocabulary_strings": "mechvis.text:vocabulary_strings",
    "with_text_appended": "mechvis.images:with_text_appended",
})
