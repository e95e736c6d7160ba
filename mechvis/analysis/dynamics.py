"""Attention dynamics over a generation: where each generated token's attention goes, layer by
layer — to the image (a VLM trace) or to instruction keyword spans (any trace).

Convention: generated token s (at position P + s, P the prompt length) is described by the
attention of the state that *produced* it, the query at position P + s − 1 (whose logits it was
drawn from), as in mechvis.analysis.repetition. So every row is available while decoding, before
the token is sampled, and rows recorded while decoding (`mechvis.studies.executors.
record_while_decoding`, hooks on the decode's forward passes) are exactly the rows of the
teacher-forced cache: `image_dynamics` reads either (`mechvis.analysis.rows`).

Per generated token × layer × head (image): image_mass = Σ_cells a (the attention on the image
tokens, in [0, 1]); on q = a_img / Σ a_img (sink cells masked): normalised entropy H(q) / ln N,
peak_to_mean = N · max q, centre of mass (row, col) in cells, and the mass of each region
(mechvis.analysis.regions; `enrichment` = mass / area)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._deprecation import deprecated, moved_names
from mechvis._validation import check_layers, check_spans, shown
from mechvis.analysis.regions import Box, box_weights, resolve_box
from mechvis.analysis.rows import Reads, is_model, row_source, trace_of
from mechvis.analysis.vision import region_metrics
from mechvis.errors import InvalidArgumentError, MissingActivationsError
from mechvis.generation.trace import Trace
from mechvis.results import Result
from mechvis.types import ImageGrid, Span

if TYPE_CHECKING:

    from mechvis.generation import Trace

DEFAULT_REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


@dataclass
class ImageDynamics(Result):
    """Image-attention metrics of each generated token (module docstring), per layer × head × token;
    `maps` is the head-mean renormalised map per layer × token."""

    tokens: list[str]
    layers: list[int]
    grid: ImageGrid
    query_positions: list[int]
    image_mass: Float[Tensor, "layer head token"]
    normalised_entropy: Float[Tensor, "layer head token"]
    peak_to_mean: Float[Tensor, "layer head token"]
    centre: Float[Tensor, "layer head token 2"]
    region_mass: dict[str, Float[Tensor, "layer head token"]]
    region_area: dict[str, float]
    maps: Float[Tensor, "layer token cell"]

    units = {"image_mass": "probability", "normalised_entropy": "fraction of log N", "peak_to_mean": "ratio",
             "centre": "cells", "maps": "probability"}
    label_fields = {"token": ("query_positions",)}

    def region_enrichment(self, region: str) -> Float[Tensor, "layer head token"]:
        """Region mass / region area: 1 for attention spread as the area, > 1 for a preference."""
        return self.region_mass[region] / self.region_area[region]

    def peaks(self, region: str, *, top: int = 5, layer: int | None = None) -> list[tuple[int, str, float]]:
        """(generated index, token text, mass) of the `top` tokens whose attention puts the most mass
        on `region` (mean over heads, and over layers unless `layer` is given)."""
        if region not in self.region_mass:
            raise InvalidArgumentError(f"No region {region!r} in these dynamics; they have {sorted(self.region_mass)}.")
        mass = self.region_mass[region]
        values = mass[self.layers.index(layer)].mean(0) if layer is not None else mass.mean(dim=(0, 1))
        order = values.argsort(descending=True)[:top].tolist()
        return [(index, self.tokens[index], float(values[index])) for index in order]


def _summarise(rows: Float[Tensor, "layer head query cell"], grid: ImageGrid, boxes: Mapping[str, Box], keep: Tensor) -> dict:
    rows = rows.double()
    masked = rows * keep
    total = masked.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise InvalidArgumentError("A generated token's attention has no mass on the (unmasked) image cells.")
    q = masked / total
    metrics = region_metrics(masked, grid)
    weights = torch.stack([box_weights(grid, box) for box in boxes.values()], -1)  # (cell, region)
    regions = torch.einsum("lhqc,cr->rlhq", q, weights)
    return {
        "image_mass": rows.sum(-1).float(),
        "normalised_entropy": metrics.normalised_entropy,
        "peak_to_mean": metrics.peak_to_mean,
        "centre": metrics.centre,
        "regions": regions.float(),
        "maps": q.mean(1).float(),
    }


def _boxes(regions: Sequence[str] | Mapping[str, Box]) -> dict[str, Box]:
    if isinstance(regions, Mapping):
        return {name: resolve_box(box) for name, box in regions.items()}
    return {name: resolve_box(name) for name in regions}


def _keep(grid: ImageGrid, sink_cells: Sequence[int]) -> Tensor:
    keep = torch.ones(grid.rows * grid.cols, dtype=torch.float64)
    for cell in sink_cells:
        if not 0 <= cell < len(keep):
            raise InvalidArgumentError(f"sink cell {cell} is outside the grid of {len(keep)} cells.")
        keep[cell] = 0.0
    return keep


def _assemble(joined: dict, tokens, layers, grid, queries, boxes) -> ImageDynamics:
    return ImageDynamics(
        tokens, layers, grid, queries, joined["image_mass"], joined["normalised_entropy"], joined["peak_to_mean"],
        joined["centre"], {name: joined["regions"][i] for i, name in enumerate(boxes)},
        {name: float(box_weights(grid, box).sum() / (grid.rows * grid.cols)) for name, box in boxes.items()}, joined["maps"],
    )


def _image_grid(trace: "Trace") -> ImageGrid:
    grid = trace.run.segments.image_grid
    if grid is None:
        raise InvalidArgumentError("This trace has no image (or an image layout without a grid); image dynamics need one.")
    if not trace.generated_ids:
        raise InvalidArgumentError("The trace generated no tokens.")
    return grid


def image_dynamics(
    source: object,
    *legacy: object,
    trace: "Trace | None" = None,
    layers: Sequence[int] | None = None,
    regions: Sequence[str] | Mapping[str, Box] = DEFAULT_REGIONS,
    sink_cells: Sequence[int] = (),
) -> ImageDynamics:
    """Image dynamics of a generation (module docstring): the rows of the states that produced
    the generated tokens (positions P + s − 1) over the image tokens, reduced per token.

    `source` supplies the rows (`mechvis.analysis.rows`): a Trace whose teacher-forced cache holds
    the attention patterns (generate with names_filter=None or hooks_for(model, "attention")), the
    `RecordedRows` of `mechvis.studies.executors.record_while_decoding` (hooks while decoding, no
    cache), or `analyse_long`'s result with `trace=` the generation it analysed: the result is the
    same for each. `regions`: names of NAMED_REGIONS or {name: (top, left, bottom, right)}.

    The old form `image_dynamics(model, trace, ...)` still works for one release and warns.

    Raises:
        InvalidArgumentError: no trace, a trace without an image or generated tokens, bad layers,
            regions or sink cells, rows the executor did not record.
        MissingActivationsError: a cache without the attention patterns."""
    source, model, _ = _legacy_model_first("image_dynamics", "image_dynamics(trace, ...)", source, legacy)
    trace = trace if trace is not None else trace_of(source)
    if trace is None:
        raise InvalidArgumentError("image_dynamics needs the generation: pass a Trace, rows recorded while decoding, or trace=.")
    grid = _image_grid(trace)
    rows_from = row_source(source, model, call="image_dynamics(trace, ...)")
    chosen = check_layers(rows_from.model, layers)
    boxes = _boxes(regions)
    queries = [position - 1 for position in trace.generated_positions]
    try:
        rows = rows_from.attention_rows(Reads(tuple(chosen), tuple(queries), tuple(grid.positions)))
    except MissingActivationsError as error:
        raise MissingActivationsError(f"{error} (or record the rows while decoding: mechvis.studies.executors.record_while_decoding, "
                                      "which needs no cache)") from None
    tokens = trace.run.str_tokens[trace.prompt_length :]
    return _assemble(_summarise(rows, grid, boxes, _keep(grid, sink_cells)), tokens, chosen, grid, queries, boxes)


def _legacy_model_first(name: str, new: str, source: object, legacy: tuple) -> tuple[object, object, tuple]:
    """(source, model, rest) of the old form `name(model, trace, *rest)`, warning."""
    if not legacy:
        return source, None, ()
    if not is_model(source):
        raise TypeError(f"{name}() takes the trace and keyword options; got {1 + len(legacy)} positional arguments.")
    deprecated(f"{name}(model, trace, ...) is deprecated: call {new} (the model is the cache's own).", stacklevel=4)
    return legacy[0], source, legacy[1:]


@dataclass
class KeywordDynamics(Result):
    """Attention of each generated token (its producing state, module docstring) to keyword spans
    of the prompt, per layer × head × token, in [0, 1]; `mass[k]` for keyword k."""

    tokens: list[str]
    layers: list[int]
    keywords: list[str]
    key_positions: dict[str, list[int]]
    mass: dict[str, Float[Tensor, "layer head token"]] = field(default_factory=dict)

    units = {"mass": "probability"}

    def per_layer(self, keyword: str) -> Float[Tensor, "layer token"]:
        """Head-mean mass on `keyword` per layer × generated token."""
        return self.mass[keyword].mean(1)


def keyword_dynamics(
    source: object,
    *legacy: object,
    keyword_spans: Mapping[str, Sequence[Span]] | None = None,
    layers: Sequence[int] | None = None,
) -> KeywordDynamics:
    """For each keyword (e.g. from find_token_spans on trace.run), the attention mass of every
    generated token to the keyword's positions, per layer × head (chain-of-thought step analysis:
    which step looked back at which part of the instruction). `source`: a Trace with the attention
    patterns, or rows an executor recorded for the generation (`mechvis.analysis.rows`).

    The old form `keyword_dynamics(model, trace, keyword_spans, ...)` still works for one release
    and warns.

    Raises:
        InvalidArgumentError: no generated tokens, keyword spans that are not {keyword: [Span]},
            a keyword without positions or outside the prompt, bad layers."""
    source, model, rest = _legacy_model_first("keyword_dynamics", "keyword_dynamics(trace, keyword_spans=..., ...)", source, legacy)
    if rest:
        if len(rest) > 1 or keyword_spans is not None:
            raise TypeError("keyword_dynamics() got keyword_spans twice or too many positional arguments.")
        keyword_spans = rest[0]
    trace = trace_of(source)
    if trace is None:
        raise InvalidArgumentError("keyword_dynamics needs the generation: pass a Trace or rows recorded while decoding.")
    if not trace.generated_ids:
        raise InvalidArgumentError("The trace generated no tokens.")
    rows_from = row_source(source, model, call="keyword_dynamics(trace, keyword_spans=...)")
    chosen = check_layers(rows_from.model, layers)
    queries = [position - 1 for position in trace.generated_positions]
    if not isinstance(keyword_spans, Mapping):
        raise InvalidArgumentError(
            f"keyword_spans must be a dict {{keyword: [Span, ...]}} (e.g. from find_token_spans); got {shown(keyword_spans)}."
        )
    keys = {}
    for keyword, spans in keyword_spans.items():
        spans = check_spans(spans, f"keyword_spans[{keyword!r}]")
        positions = sorted({p for span in spans for p in span.positions})
        if not positions:
            raise InvalidArgumentError(f"The keyword {keyword!r} has no token span (see find_token_spans).")
        if positions[-1] >= trace.prompt_length:
            raise InvalidArgumentError(f"The keyword {keyword!r} lies outside the prompt.")
        keys[keyword] = positions
    columns = sorted({p for positions in keys.values() for p in positions})
    rows = rows_from.attention_rows(Reads(tuple(chosen), tuple(queries), tuple(columns))).double()
    masses = {keyword: rows[..., [columns.index(p) for p in positions]].sum(-1).float() for keyword, positions in keys.items()}
    return KeywordDynamics(trace.run.str_tokens[trace.prompt_length :], chosen, list(keys), keys, masses)


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "stream_image_dynamics": "mechvis.studies.streamed:stream_image_dynamics",
})
