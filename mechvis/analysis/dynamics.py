"""Attention dynamics over a generation: where each generated token's attention goes, layer by
layer — to the image (a VLM trace) or to instruction keyword spans (any trace).

Convention: generated token s (at position P + s, P the prompt length) is described by the
attention of the state that *produced* it, the query at position P + s − 1 (whose logits it was
drawn from), as in mechvis.analysis.repetition. So every row is available while decoding, before
the token is sampled, and the streamed computation (`stream_image_dynamics`, hooks on the decode's
forward passes) sees exactly the rows of the teacher-forced one (`image_dynamics`).

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

from mechvis._deprecation import moved_names
from mechvis._validation import activation, check_layers, check_spans, shown
from mechvis.analysis.regions import Box, box_weights, resolve_box
from mechvis.analysis.vision import region_metrics
from mechvis.errors import InvalidArgumentError, MissingActivationsError
from mechvis.generation.trace import Trace
from mechvis.models.architecture import pattern_hook
from mechvis.types import ImageGrid, Span

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace

DEFAULT_REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


@dataclass
class ImageDynamics:
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


def _assemble(parts: list[dict], tokens, layers, grid, queries, boxes) -> ImageDynamics:
    joined = {name: torch.cat([part[name] for part in parts], dim=-2 if name in ("centre", "maps") else -1) for name in parts[0]}
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
    model: "TransformerBridge",
    trace: "Trace",
    *,
    layers: Sequence[int] | None = None,
    regions: Sequence[str] | Mapping[str, Box] = DEFAULT_REGIONS,
    sink_cells: Sequence[int] = (),
) -> ImageDynamics:
    """Image dynamics from the trace's teacher-forced pass (its cache must hold the attention
    patterns: generate with names_filter=None or hooks_for(model, "attention")). `regions`: names
    of NAMED_REGIONS or {name: (top, left, bottom, right)}."""
    grid = _image_grid(trace)
    chosen = check_layers(model, layers)
    boxes = _boxes(regions)
    queries = [position - 1 for position in trace.generated_positions]
    cells = list(grid.positions)
    try:
        rows = torch.stack([activation(trace.run.cache, pattern_hook(layer))[:, queries][..., cells] for layer in chosen])
    except MissingActivationsError as error:
        raise MissingActivationsError(f"{error} (or use stream_image_dynamics, which needs no cache)") from None
    tokens = trace.run.str_tokens[trace.prompt_length :]
    return _assemble([_summarise(rows, grid, boxes, _keep(grid, sink_cells))], tokens, chosen, grid, queries, boxes)


@dataclass
class KeywordDynamics:
    """Attention of each generated token (its producing state, module docstring) to keyword spans
    of the prompt, per layer × head × token, in [0, 1]; `mass[k]` for keyword k."""

    tokens: list[str]
    layers: list[int]
    keywords: list[str]
    key_positions: dict[str, list[int]]
    mass: dict[str, Float[Tensor, "layer head token"]] = field(default_factory=dict)

    def per_layer(self, keyword: str) -> Float[Tensor, "layer token"]:
        """Head-mean mass on `keyword` per layer × generated token."""
        return self.mass[keyword].mean(1)


def keyword_dynamics(
    model: "TransformerBridge",
    trace: "Trace",
    keyword_spans: Mapping[str, Sequence[Span]],
    *,
    layers: Sequence[int] | None = None,
) -> KeywordDynamics:
    """For each keyword (e.g. from find_token_spans on trace.run), the attention mass of every
    generated token to the keyword's positions, per layer × head (chain-of-thought step analysis:
    which step looked back at which part of the instruction)."""
    if not trace.generated_ids:
        raise InvalidArgumentError("The trace generated no tokens.")
    chosen = check_layers(model, layers)
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
    rows = torch.stack([activation(trace.run.cache, pattern_hook(layer))[:, queries] for layer in chosen]).double()
    masses = {keyword: rows[..., positions].sum(-1).float() for keyword, positions in keys.items()}
    return KeywordDynamics(trace.run.str_tokens[trace.prompt_length :], chosen, list(keys), keys, masses)


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "stream_image_dynamics": "mechvis.studies.streamed:stream_image_dynamics",
})
