"""Attention analyses: head entropy (Clark et al. 2019; Voita et al. 2019) with sink mass,
attention rollout (Abnar & Zuidema 2020), and attention to keyword spans ("instruction focus")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._deprecation import moved_names
from mechvis._numerics import LN2, log2_inplace, row_entropy
from mechvis._validation import (
    activation,
    analysis_form,
    check_integer,
    check_layers,
    check_positions,
    check_real,
    check_span,
    check_spans,
)
from mechvis.errors import InvalidArgumentError
from mechvis.models.architecture import LayerAttention, attention_layout, pattern_hook
from mechvis.results import Result
from mechvis.types import Span

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge



@analysis_form('attention_patterns(run_or_cache, *, layers=None)', options=('layers',))
def attention_patterns(
    cache: "ActivationCache", model: "TransformerBridge", layers: Sequence[int] | None = None
) -> Float[Tensor, "layer head query key"]:
    """Attention probabilities of the chosen layers (default: all), per query head."""
    return torch.stack([activation(cache, pattern_hook(layer)) for layer in check_layers(model, layers)])


@dataclass
class HeadEntropy(Result):
    """Per layer × head × query position: entropy of the attention row in nats, the same divided by
    log(visible keys) (NaN where a query sees a single key), and the mass on sink positions.

    Entropy of each head's own row; the entropy of a head-averaged pattern is a different number.
    """

    units = {'entropy': 'nats', 'normalised': 'fraction (of log visible keys)', 'sink_mass': 'probability'}

    layers: list[int]
    entropy: Float[Tensor, "layer head query"]  # nats
    normalised: Float[Tensor, "layer head query"]  # in [0, 1]
    sink_mass: Float[Tensor, "layer head query"]  # in [0, 1]
    sink_positions: tuple[int, ...]

    @property
    def mean_normalised(self) -> Float[Tensor, "layer head"]:
        """Per head: mean normalised entropy over queries that see more than one key."""
        return self.normalised.nanmean(dim=-1)

    @property
    def mean_sink_mass(self) -> Float[Tensor, "layer head"]:
        """Per head: mean attention mass on the sink positions, over queries past the sinks."""
        first = max(self.sink_positions, default=-1) + 1
        return self.sink_mass[..., first:].mean(dim=-1) if first < self.sink_mass.shape[-1] else self.sink_mass.mean(-1)

    def classify(self, *, sink_threshold: float = 0.5, focused_below: float = 0.3, diffuse_above: float = 0.7) -> list[tuple[int, int, str]]:
        """(layer, head, kind) for every head. kind: "sink" (mean sink mass ≥ sink_threshold),
        else "focused" / "diffuse" by mean normalised entropy, else "mixed"."""
        sink_threshold, focused_below, diffuse_above = (
            check_real(value, name, low=0.0, high=1.0) for value, name in
            ((sink_threshold, "sink_threshold"), (focused_below, "focused_below"), (diffuse_above, "diffuse_above")))
        kinds = []
        for row, layer in enumerate(self.layers):
            for head in range(self.entropy.shape[1]):
                if self.mean_sink_mass[row, head] >= sink_threshold:
                    kind = "sink"
                elif self.mean_normalised[row, head] < focused_below:
                    kind = "focused"
                elif self.mean_normalised[row, head] > diffuse_above:
                    kind = "diffuse"
                else:
                    kind = "mixed"
                kinds.append((layer, head, kind))
        return kinds

    def ranked(self, *, lowest: bool = True) -> list[tuple[int, int, float]]:
        """(layer, head, mean normalised entropy) sorted by it, most focused first by default."""
        values = self.mean_normalised
        order = values.flatten().argsort(descending=not lowest).tolist()
        n_heads = values.shape[1]
        return [(self.layers[i // n_heads], i % n_heads, values.flatten()[i].item()) for i in order]


_QUERY_BLOCK = 64


def _visible_row_entropy(
    pattern: Float[Tensor, "head query key"], layer: LayerAttention, *, scratch: Tensor
) -> Float[Tensor, "head query"]:
    """`row_entropy` of a pattern whose rows see only the keys `layer`'s mask allows, reading for
    each block of queries only the keys between its first query's first visible key and its last
    query's last visible key (the rest are zeros and add nothing): about half the entries of a
    causal pattern at N ≫ 64, a band for a sliding window. If the rows' mass is not all there
    (a pattern attending outside the mask), every key is read instead."""
    n_queries, n_keys = pattern.shape[-2:]
    offset = n_keys - n_queries  # queries are the last positions when keys include a prefix
    starts = torch.arange(0, n_queries, _QUERY_BLOCK)
    firsts = layer.first_visible(starts + offset).tolist()
    lasts = layer.last_visible((starts + _QUERY_BLOCK - 1).clamp_max(n_queries - 1) + offset, n_keys).tolist()
    parts, masses = [], []
    tiny = torch.finfo(pattern.dtype).tiny
    for start, first, last in zip(starts.tolist(), firsts, lasts):  # tiles of 64 queries, not single tokens
        visible = pattern[..., start : start + _QUERY_BLOCK, first : last + 1]
        # row_entropy's steps, with the tile's mass summed from its contiguous clamped copy (the
        # clamp adds < 1e-34 per entry) and checked once per layer: no wait on every tile
        clamped = torch.clamp(visible, min=tiny, out=scratch.view(-1)[: visible.numel()].view(visible.shape))
        masses.append(clamped.sum(-1).amin())
        parts.append(log2_inplace(clamped).mul_(visible).sum(-1).mul_(-LN2))
    if float(torch.stack(masses).amin()) < 1.0 - 1e-3:
        return row_entropy(pattern, scratch=scratch)
    return torch.cat(parts, dim=-1)


@analysis_form('head_entropy(run_or_cache, *, layers=None, sink_positions=(0,))')
def head_entropy(
    cache: "ActivationCache",
    model: "TransformerBridge",
    *,
    layers: Sequence[int] | None = None,
    sink_positions: Sequence[int] = (0,),
) -> HeadEntropy:
    """Entropy of every head's attention rows (nats), normalised by log(visible keys), with sink mass.

    Visible keys come from each layer's mask (`visible_keys`: causal, sliding window, chunks), so a
    head spreading its mass evenly over the keys it may see has normalised entropy 1 on windowed
    layers too. Raises UnsupportedArchitectureError for layers whose mask mechvis does not know,
    MissingActivationsError without `hook_pattern`, InvalidArgumentError for bad layers/positions.
    """
    chosen = check_layers(model, layers)
    first = activation(cache, pattern_hook(chosen[0]))
    n_positions = first.shape[-1]
    sinks = check_positions(n_positions, sink_positions, empty=True)
    # Layer by layer through one scratch buffer: stacking every pattern first would copy
    # layers × heads × pos² floats, and a fresh buffer per layer pays its page faults each time.
    scratch = torch.empty_like(first, dtype=torch.float32)
    layout = attention_layout(model)
    entropy = torch.stack([
        _visible_row_entropy(activation(cache, pattern_hook(layer)).float(), layout[layer], scratch=scratch)
        for layer in chosen
    ])
    sink_mass = (
        torch.stack([activation(cache, pattern_hook(layer))[..., sinks].float().sum(-1) for layer in chosen])
        if sinks else torch.zeros_like(entropy)
    )
    log_visible = torch.stack([layout[layer].visible_keys(n_positions) for layer in chosen]).to(entropy.device).float().log()[:, None, :]
    normalised = torch.where(log_visible > 0, entropy / log_visible.clamp_min(1e-12), torch.nan)
    return HeadEntropy(chosen, entropy, normalised, sink_mass, tuple(sinks))


@dataclass
class Rollout(Result):
    """Attention rollout: `matrix[q, k]` is how much of query q's representation traces back to
    input token k through every layer's attention and residual path. Rows sum to 1 (before any
    key span restriction; `span_mass` keeps what the span held)."""

    units = {'matrix': 'probability (rows sum to 1)', 'span_mass': 'probability'}

    matrix: Float[Tensor, "query key"]
    head_fusion: str
    residual_weight: float
    layers: list[int]
    key_span: Span | None = None
    span_mass: Float[Tensor, " query"] | None = None


def augmented_attention(
    patterns: Float[Tensor, "... head query key"], head_fusion: str = "mean", residual_weight: float = 0.5
) -> Float[Tensor, "... query key"]:
    """One rollout factor per layer: Â = (1 − w)·fuse_h(A) + w·I, rows renormalised (float64)."""
    if head_fusion not in ("mean", "max", "min"):
        raise InvalidArgumentError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}.")
    residual_weight = check_real(residual_weight, "residual_weight", low=0.0, high=1.0)
    patterns = patterns.double()
    fused = {"mean": patterns.mean(-3), "max": patterns.amax(-3), "min": patterns.amin(-3)}[head_fusion]
    identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    augmented = (1.0 - residual_weight) * fused + residual_weight * identity
    return augmented / augmented.sum(dim=-1, keepdim=True)


def rollout_product(augmented: Float[Tensor, "layer query key"]) -> Float[Tensor, "query key"]:
    """R = Â_L ⋯ Â_1 (the first layer's factor rightmost)."""
    result = torch.eye(augmented.shape[-1], dtype=augmented.dtype, device=augmented.device)
    for layer_matrix in augmented:  # R ← Â_ℓ R, a product over layers (not over tokens or heads)
        result = layer_matrix @ result
    return result


def rollout_matrix(
    patterns: Float[Tensor, "layer head query key"], head_fusion: str = "mean", residual_weight: float = 0.5
) -> Float[Tensor, "query key"]:
    """R = Â_L ⋯ Â_1 with Â_ℓ = (1 − w)·fuse_h(A_ℓ) + w·I, rows renormalised (float64)."""
    return rollout_product(augmented_attention(patterns, head_fusion, residual_weight))


@analysis_form('rollout(run_or_cache, *, head_fusion="mean", residual_weight=0.5, layers=None, key_span=None)')
def rollout(
    cache: "ActivationCache",
    model: "TransformerBridge",
    *,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    residual_weight: float = 0.5,
    layers: Sequence[int] | None = None,
    key_span: Span | None = None,
) -> Rollout:
    """Â_ℓ = (1 − w)·fuse_h(A_ℓ) + w·I with rows renormalised; R = Â_L ⋯ Â_1.

    Args:
        head_fusion: how heads are combined per layer.
        residual_weight: w, the share of the identity (the residual path); 0.5 in the paper.
        layers: which layers to multiply (default all, in order).
        key_span: keep only these key columns, rows renormalised over them (`span_mass` holds
            the mass the span had before).
    """
    chosen = check_layers(model, layers)
    key_span = None if key_span is None else check_span(key_span, "key_span")
    residual_weight = check_real(residual_weight, "residual_weight", low=0.0, high=1.0)
    result = rollout_matrix(attention_patterns.__wrapped__(cache, model, chosen), head_fusion, residual_weight)
    result, span_mass = _restricted_to_span(result, key_span)
    return Rollout(result.float(), head_fusion, residual_weight, chosen, key_span, span_mass)


def _restricted_to_span(
    rows: Float[Tensor, "query key"], key_span: Span | None
) -> tuple[Float[Tensor, "query key"], Float[Tensor, " query"] | None]:
    """Rollout rows restricted to `key_span`'s columns and renormalised over them, with the mass
    the span held before (float32); unchanged rows and None without a span."""
    if key_span is None:
        return rows, None
    if not 0 <= key_span.start < key_span.stop <= rows.shape[-1]:
        raise InvalidArgumentError(f"key_span {key_span} is outside the sequence of {rows.shape[-1]} tokens.")
    columns = rows[:, key_span.start : key_span.stop]
    span_mass = columns.sum(-1)
    return columns / span_mass.clamp_min(1e-300)[:, None], span_mass.float()


@dataclass
class RolloutRows(Result):
    """Attention rollout for chosen query rows only: `rows[i, k]` equals `Rollout.matrix[queries[i], k]`.

    The full matrix costs N² memory and an N³ product; k rows cost k·N per layer to hold and
    k·N² to propagate, which is what long contexts and reports need.
    """

    units = {'rows': 'probability (rows sum to 1)', 'span_mass': 'probability'}

    rows: Float[Tensor, "query key"]
    queries: list[int]
    head_fusion: str
    residual_weight: float
    layers: list[int]
    key_span: Span | None = None
    span_mass: Float[Tensor, " query"] | None = None


def propagate_rollout_rows(
    rows: Float[Tensor, "query key"], augmented: Float[Tensor, "position key"]
) -> Float[Tensor, "query key"]:
    """One step of rollout from the output side: rows ← rows · Â_ℓ (float64).

    Rollout is R = Â_L ⋯ Â_1, so the rows e_qᵀR come from multiplying e_qᵀ by Â_L first and Â_1
    last: walk the layers from the top down.
    """
    return rows @ augmented


@analysis_form('rollout_rows(run_or_cache, *, queries, head_fusion=..., residual_weight=..., layers=..., key_span=...)', options=('queries',))
def rollout_rows(
    cache: "ActivationCache",
    model: "TransformerBridge",
    queries: Sequence[int],
    *,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    residual_weight: float = 0.5,
    layers: Sequence[int] | None = None,
    key_span: Span | None = None,
) -> RolloutRows:
    """Rows of attention rollout (Abnar & Zuidema 2020) for the chosen query positions.

    Equal to `rollout(...).matrix[queries]` (same Â_ℓ, same key-span renormalisation) at
    O(k·N²) per layer instead of the N³ product; float64 throughout, returned as float32.

    Args:
        queries: query positions (negative counts from the end), at least one.
        head_fusion, residual_weight, layers, key_span: as in `rollout`.

    Raises:
        InvalidArgumentError: no query, a query outside the sequence, a bad span, fusion or weight.
    """
    chosen = check_layers(model, layers)
    key_span = None if key_span is None else check_span(key_span, "key_span")
    residual_weight = check_real(residual_weight, "residual_weight", low=0.0, high=1.0)
    n_positions = activation(cache, pattern_hook(chosen[0])).shape[-1]
    if queries is None:
        raise InvalidArgumentError("rollout_rows needs at least one query position (rollout gives every row).")
    query_list = check_positions(n_positions, queries)
    rows = torch.zeros(len(query_list), n_positions, dtype=torch.float64)
    rows[torch.arange(len(query_list)), torch.tensor(query_list)] = 1.0
    for layer in reversed(chosen):  # e_qᵀ Â_L ⋯ Â_1: the top layer's factor first
        pattern = activation(cache, pattern_hook(layer))
        rows = propagate_rollout_rows(rows, augmented_attention(pattern, head_fusion, residual_weight).to(rows.device))
    rows, span_mass = _restricted_to_span(rows, key_span)
    return RolloutRows(rows.float(), query_list, head_fusion, residual_weight, chosen, key_span, span_mass)


@dataclass
class SpanAttention(Result):
    """Attention mass from each query position to the union of key spans, per layer × head."""

    units = {'mass': 'probability'}

    layers: list[int]
    query_positions: list[int]
    key_positions: list[int]
    mass: Float[Tensor, "layer head query"]  # in [0, 1]

    @property
    def mean_mass(self) -> Float[Tensor, "layer head"]:
        return self.mass.mean(dim=-1)

    def ranked_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """(layer, head, mean mass) of the `n` heads that attend most to the spans."""
        n = check_integer(n, "n", low=1, hint=" (how many heads to return)")
        flat = self.mean_mass.flatten()
        n_heads = self.mean_mass.shape[1]
        order = flat.argsort(descending=True)[:n].tolist()
        return [(self.layers[i // n_heads], i % n_heads, flat[i].item()) for i in order]


@analysis_form('attention_to_spans(run_or_cache, *, key_spans, query_positions=None, layers=None)', options=('key_spans',))
def attention_to_spans(
    cache: "ActivationCache",
    model: "TransformerBridge",
    key_spans: Sequence[Span],
    *,
    query_positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> SpanAttention:
    """How much attention `query_positions` (default: the last position) pay to `key_spans`.

    Raises:
        InvalidArgumentError: `key_spans` not a list of `mechvis.Span` (a tuple of positions, one
            Span alone), no key position, bad layers or positions.
    """
    key_spans = check_spans(key_spans, "key_spans")
    chosen = check_layers(model, layers)
    patterns = attention_patterns.__wrapped__(cache, model, chosen)
    n_positions = patterns.shape[-1]
    queries = check_positions(n_positions, query_positions if query_positions is not None else [-1])
    keys = sorted({p for span in key_spans for p in span.positions})
    if not keys:
        raise InvalidArgumentError("No key positions: pass at least one non-empty span (see find_token_spans).")
    check_positions(n_positions, keys)
    mass = einops.reduce(patterns[:, :, queries][..., keys].float(), "layer head query key -> layer head query", "sum")
    return SpanAttention(chosen, queries, keys, mass)


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "find_token_spans": "mechvis.analysis.spans:find_token_spans",
    "visible_keys": "mechvis.models.architecture:visible_keys",
})
