"""What an analysis reads, and the row sources that supply it (DESIGN, "One name per metric").

An analysis declares what it reads — the attention rows of some layers for some query positions
over some key positions (`Reads`), the rollout rows of some queries, whole hooks such as a vision
tower's patterns — and reduces them to its result. Where the rows come from is the executor's
business; every source answers the same three questions (`RowSource`):

- a run (or trace, or cache) with the full cache: `CacheRows` slices the cache;
- a run produced by a row-recording executor carries exactly the declared rows
  (`RecordedRows`): one forward whose hooks keep only query rows × image columns, or hooks while
  decoding (`mechvis.studies.executors`);
- the blocked long-context forward (`mechvis.studies.longcontext.analyse_long`): its
  `LongContextAnalysis` is a row source over the image rows and rollout rows it kept.

So `image_attention(x, ...)` is one function whatever produced `x`, and its result is the same
(float rounding aside) for every executor. Nothing here runs the model.

    >>> import torch
    >>> recorded = RecordedRows(None, n_positions=6, layers=[0, 1], queries=[5], keys=[1, 2],
    ...                         rows=torch.arange(8.0).reshape(2, 2, 1, 2))
    >>> recorded.attention_rows(Reads(layers=(1,), queries=(5,), keys=(2,))).flatten().tolist()
    [5.0, 7.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._validation import activation, cache_and_model
from mechvis.analysis.attention import rollout_matrix
from mechvis.errors import InvalidArgumentError, MechvisDeprecationWarning
from mechvis.models.architecture import pattern_hook
from mechvis.types import ImageGrid

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class Reads:
    """The attention probabilities an analysis reads: `layers` × every head × `queries` × `keys`
    (None: every key). Positions are non-negative (validated by the analysis before it asks)."""

    layers: tuple[int, ...]
    queries: tuple[int, ...]
    keys: tuple[int, ...] | None = None


@runtime_checkable
class RowSource(Protocol):
    """What every executor's product answers: the model it ran, the sequence length, the declared
    attention rows (layer, head, query, key), the rollout rows e_qᵀ Â_L ⋯ Â_1 (query, key; float64)
    and whole hooks it kept ({name: tensor with its batch dimension})."""

    model: "TransformerBridge"
    n_positions: int
    hooks: Mapping[str, Tensor]

    def attention_rows(self, reads: Reads) -> Float[Tensor, "layer head query key"]: ...

    def rollout_rows(self, queries: Sequence[int], head_fusion: str, residual_weight: float) -> Float[Tensor, "query key"]: ...


@dataclass
class CacheRows:
    """A full activation cache as a row source: every read is a slice of the cache."""

    cache: Any
    model: "TransformerBridge"

    @property
    def hooks(self) -> Mapping[str, Tensor]:
        return self.cache

    @property
    def n_positions(self) -> int:
        present = [layer for layer in range(self.model.cfg.n_layers) if pattern_hook(layer) in self.cache]
        return activation(self.cache, pattern_hook(present[0] if present else 0)).shape[-1]

    def attention_rows(self, reads: Reads) -> Float[Tensor, "layer head query key"]:
        queries = list(reads.queries)
        patterns = [activation(self.cache, pattern_hook(layer))[:, queries] for layer in reads.layers]
        return torch.stack([p if reads.keys is None else p[..., list(reads.keys)] for p in patterns])

    def rollout_rows(self, queries: Sequence[int], head_fusion: str, residual_weight: float) -> Float[Tensor, "query key"]:
        patterns = torch.stack([activation(self.cache, pattern_hook(layer)) for layer in range(self.model.cfg.n_layers)])
        return rollout_matrix(patterns, head_fusion, residual_weight)[list(queries)]


def select_recorded(
    rows: Float[Tensor, "layer head query key"], recorded: tuple[Sequence[int], Sequence[int], Sequence[int]], reads: Reads, how: str,
) -> Float[Tensor, "layer head query key"]:
    """The `reads` of rows an executor recorded for (layers, queries, keys); `how` names the
    executor's argument that declares them, for the error.

    Raises:
        InvalidArgumentError: a layer, query or key position that was not recorded."""
    index = []
    for name, wanted, have in zip(("layer", "query position", "key position"), (reads.layers, reads.queries, reads.keys), recorded):
        have = list(have)
        if wanted is None:
            wanted = have
        missing = [value for value in wanted if value not in have]
        if missing:
            raise InvalidArgumentError(f"The {name} {missing[0]} was not recorded ({how}: {have}); include it there.")
        index.append(torch.tensor([have.index(value) for value in wanted], dtype=torch.long))
    layers, queries, keys = index
    return rows[layers][:, :, queries][..., keys]


@dataclass
class RecordedRows:
    """The product of a row-recording executor: the attention rows of `layers` × `queries` ×
    `keys` it kept (layer, head, query, key) and, where it had them, the sequence they belong
    to (its segments, with the image grid; the generation) and whole hooks."""

    model: "TransformerBridge"
    n_positions: int
    layers: list[int]
    queries: list[int]
    keys: list[int]
    rows: Float[Tensor, "layer head query key"]
    segments: Any = None  # mechvis.Segments of the recorded sequence (its image grid)
    trace: Any = None  # mechvis.generation.Trace, for an executor that generated
    hooks: dict[str, Tensor] = field(default_factory=dict)
    recorded_by: str = "the executor's declared rows"

    def attention_rows(self, reads: Reads) -> Float[Tensor, "layer head query key"]:
        return select_recorded(self.rows, (self.layers, self.queries, self.keys), reads, self.recorded_by)

    def rollout_rows(self, queries: Sequence[int], head_fusion: str, residual_weight: float) -> Float[Tensor, "query key"]:
        raise InvalidArgumentError(f"Rows recorded by {self.recorded_by} hold no rollout rows; use a full cache or analyse_long.")


def row_source(source: object, model: object = None, *, call: str = "analysis") -> RowSource:
    """The row source of an analysis's first argument: itself if it is one (an executor's
    product), else the full cache of a Run, a Trace or an ActivationCache (`CacheRows`).

    Raises:
        InvalidArgumentError: none of these (see `mechvis._validation.cache_and_model`)."""
    if _is_row_source(source):
        return source  # type: ignore[return-value]
    with warnings.catch_warnings():  # the old (cache, model) forms: their callers warned already
        warnings.simplefilter("ignore", MechvisDeprecationWarning)
        cache, model = cache_and_model(source, model, call=call)
    return CacheRows(cache, model)


def trace_of(source: object) -> Any:
    """The generation trace behind `source` (a Trace, or an executor's product that generated), or None."""
    if hasattr(source, "generated_ids"):
        return source
    return getattr(source, "trace", None)


def image_grid_of(source: object, grid: ImageGrid | None) -> ImageGrid:
    """`grid` if given, else the image grid of the run behind `source`.

    Raises:
        InvalidArgumentError: no grid given and none known (a cache alone, a run without an image)."""
    if grid is not None:
        if not isinstance(grid, ImageGrid):
            raise InvalidArgumentError(f"grid must be a mechvis.ImageGrid (run.segments.image_grid); got {type(grid).__name__}.")
        return grid
    for candidate in (trace_of(source), source):
        run = getattr(candidate, "run", None) if candidate is not None else None
        segments = getattr(run if run is not None else candidate, "segments", None)
        found = getattr(segments, "image_grid", None)
        if found is not None:
            return found
    raise InvalidArgumentError("No image grid: pass grid= (run.segments.image_grid) or a run with an image.")


def is_model(value: object) -> bool:
    """Whether `value` looks like a hooked model (the deprecated first argument of the old forms)."""
    return hasattr(value, "cfg") and hasattr(value, "blocks") and not _is_row_source(value)


def _is_row_source(value: object) -> bool:
    return callable(getattr(type(value), "attention_rows", None)) and callable(getattr(type(value), "rollout_rows", None))


__all__ = ["CacheRows", "Reads", "RecordedRows", "RowSource", "image_grid_of", "is_model", "row_source", "select_recorded", "trace_of"]

