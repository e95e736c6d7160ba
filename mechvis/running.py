"""`run`: one forward pass of a hooked model over a prompt, with token spans (segments).

Tokenisation follows the model's own tokenizer (`model.hf_tokenizer`, kept by `load_model`), so
the tokens are exactly what the model's HF pipeline would feed it; chat mode renders the model's
chat template with the generation prompt appended.
"""

from __future__ import annotations

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

    `kind` is one of: "bos", "text" (completion prompt), "system", "user", "assistant"
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
class Segments:
    """The parts of a token sequence, in order, covering every position exactly once.

    `sink_positions` are the positions reported separately from attention summaries: the first
    token, which every causal query can see and where heads park unused attention.
    """

    spans: tuple[Span, ...]
    sink_positions: tuple[int, ...]

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
    """A prompt as tokens, with the character offset of each token in `text`."""

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    segments: Segments


@dataclass
class Run:
    """What one forward pass produced.

    `tokens` and `logits` have no batch dimension; `cache` is transformer-lens'
    `ActivationCache` with its usual batch dimension of size 1.
    """

    text: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    offsets: list[tuple[int, int]]
    logits: Float[Tensor, "pos vocab"]
    cache: "ActivationCache"
    segments: Segments


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
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(message["content"].strip() for message in checked):
        raise InvalidArgumentError("Every message of the chat is empty; give the model some text.")
    return checked


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
    tokenizer = model.hf_tokenizer
    if chat:
        if prepend_bos is not None:
            raise InvalidArgumentError("prepend_bos applies to completion mode; the chat template decides in chat mode.")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError(
                "This model's tokenizer has no chat template; use chat=False (completion mode)."
            )
        messages = _validate_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        labelled, cursor = [], 0
        for message in messages:
            start = text.find(message["content"], cursor)
            if start < 0 or not message["content"]:
                continue
            labelled.append((message["role"], start, start + len(message["content"])))
            cursor = start + len(message["content"])
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
    return Encoded(text, token_ids, offsets, Segments(_merge_spans(kinds), (0,)))


def str_tokens_of(model: "TransformerBridge", token_ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (the text a person reads, e.g. ' Paris')."""
    return model.hf_tokenizer.batch_decode([[token] for token in token_ids])


def run(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    chat: bool = False,
    prepend_bos: bool | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
) -> Run:
    """Run the model once over `prompt` and cache its activations.

    Args:
        prompt, chat, prepend_bos: as in `encode`.
        names_filter: which hooks to cache (transformer-lens `names_filter`); None caches all.
            Attention patterns cost layers × heads × pos² floats: filter for long prompts.
    """
    encoded = encode(model, prompt, chat=chat, prepend_bos=prepend_bos)
    device = model.cfg.device
    tokens = torch.tensor(encoded.token_ids, dtype=torch.long, device=device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names_filter)
    return Run(
        text=encoded.text,
        tokens=tokens,
        str_tokens=str_tokens_of(model, encoded.token_ids),
        offsets=encoded.offsets,
        logits=logits[0],
        cache=cache,
        segments=encoded.segments,
    )
