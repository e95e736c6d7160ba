"""The shared types every layer speaks: token spans (`Span`, `Segments`), image grids, encoded
prompts and decoded tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    pass


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


@dataclass(frozen=True)
class DecodedTokens:
    """A token sequence decoded as a whole (see `decode_tokens`)."""

    text: str
    offsets: list[tuple[int, int]]
    str_tokens: list[str]
