"""Image-region attention metrics: where a query looks inside the image, how concentrated that is,
and how heads differ (definitions in shared REFERENCES, "Image-region attention").

For a query row with N image tokens, `image_mass` is always reported; every other metric is
computed on q = a_img / m (the attention renormalised over the image tokens, visual sink tokens
masked). Grids are row-major over the model's LLM image tokens (rows × cols after any merge)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import ndimage
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import jensenshannon, pdist, squareform
from torch import Tensor
from transformers.vision_utils import get_vision_window_index

from mechvis._deprecation import deprecated, moved_names
from mechvis._validation import activation, check_layers, check_positions, check_real, require_hooks
from mechvis.analysis.attention import augmented_attention, rollout_matrix, rollout_product
from mechvis.analysis.geometry import earth_movers_distance, hausdorff_distance, map_geometry
from mechvis.analysis.information import grid_regions, region_token_information
from mechvis.analysis.regions import NAMED_REGIONS, region_mass
from mechvis.analysis.rows import Reads, image_grid_of, row_source
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.types import ImageGrid

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class RegionMetrics(Result):
    """Concentration and location of attention maps q over the grid (leading dims of the input).

    entropy in nats; normalised_entropy = entropy / log N; effective_number = exp(entropy);
    gini normalised by its maximum (N − 1)/N (1 = one cell, 0 = uniform); k90 = fewest cells holding
    90% of the mass; peak_to_mean = N · max q; centre = mass-weighted (row, col);
    spatial_variance = mass-weighted squared distance to the centre (cells²).
    """

    units = {"entropy": "nats", "normalised_entropy": "fraction of log N", "effective_number": "cells", "gini": "fraction",
             "k90": "cells", "k90_fraction": "fraction", "peak_to_mean": "ratio", "centre": "cells", "spatial_variance": "cells²"}

    entropy: Float[Tensor, "..."]
    normalised_entropy: Float[Tensor, "..."]
    effective_number: Float[Tensor, "..."]
    gini: Float[Tensor, "..."]
    k90: Int[Tensor, "..."]
    k90_fraction: Float[Tensor, "..."]
    peak_to_mean: Float[Tensor, "..."]
    centre: Float[Tensor, "... 2"]
    spatial_variance: Float[Tensor, "..."]


def region_metrics(maps: Float[Tensor, "... n"], grid: ImageGrid, *, coverage: float = 0.9) -> RegionMetrics:
    """Metrics of attention maps over the grid's cells; each map is renormalised to sum to 1."""
    n = grid.rows * grid.cols
    if maps.shape[-1] != n:
        raise InvalidArgumentError(f"Maps have {maps.shape[-1]} cells; the grid has {n}.")
    if not 0 < coverage <= 1:
        raise InvalidArgumentError(f"coverage must be in (0, 1]; got {coverage}.")
    q = maps.double().clamp_min(0)
    total = q.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise InvalidArgumentError("A map has no attention mass on the image; its distribution is undefined.")
    q = q / total
    entropy = torch.special.entr(q).sum(-1)
    ascending = q.sort(dim=-1).values
    ranks = torch.arange(1, n + 1, dtype=q.dtype)
    gini = ((2 * ranks - n - 1) * ascending).sum(-1) / n
    gini = gini / ((n - 1) / n) if n > 1 else torch.zeros_like(gini)
    cumulative = ascending.flip(-1).cumsum(-1)
    k90 = (cumulative < coverage - 1e-12).sum(-1) + 1
    coordinates = grid.coordinates
    centre = q @ coordinates
    offsets = coordinates - centre[..., None, :]
    variance = (q * offsets.pow(2).sum(-1)).sum(-1)
    return RegionMetrics(
        entropy=entropy.float(),
        normalised_entropy=(entropy / math.log(n)).float() if n > 1 else torch.zeros_like(entropy).float(),
        effective_number=entropy.exp().float(),
        gini=gini.float(),
        k90=k90,
        k90_fraction=(k90.double() / n).float(),
        peak_to_mean=(n * q.amax(-1)).float(),
        centre=centre.float(),
        spatial_variance=variance.float(),
    )


@dataclass
class ImageAttention(Result):
    """Attention from query positions to the image, per layer × head × query: the image mass and
    the region metrics of the attention renormalised over the image (sink cells masked)."""

    units = {"image_mass": "probability", "maps": "probability"}

    layers: list[int]
    query_positions: list[int]
    grid: ImageGrid
    image_mass: Float[Tensor, "layer head query"]
    maps: Float[Tensor, "layer head query cell"]  # renormalised over the image, sinks zeroed
    metrics: RegionMetrics

    @property
    def mass_per_layer(self) -> Float[Tensor, " layer"]:
        """Mean image mass over heads and queries (the FastV view: high early, low late)."""
        return self.image_mass.mean(dim=(1, 2))


def image_attention(
    source: object,
    *legacy: object,
    grid: ImageGrid | None = None,
    query_positions: Sequence[int],
    layers: Sequence[int] | None = None,
    sink_cells: Sequence[int] = (),
) -> ImageAttention:
    """Attention of `query_positions` (e.g. the generated tokens) to the grid's image tokens, per
    layer × head × query: the image mass and the region metrics of the attention renormalised over
    the image (`sink_cells` masked).

    `source` is anything that supplies attention rows (`mechvis.analysis.rows`): a Run, a Trace or
    an ActivationCache with the attention patterns, a `RecordedRows` from
    `mechvis.studies.executors.record_attention_rows` (one forward keeping only these rows), or
    `analyse_long`'s result (the blocked long-context forward): the result is the same for each.
    `grid` defaults to the run's image grid. Reads layers × queries × image positions.

    The old form `image_attention(cache, model, grid, ...)` still works for one release and warns.

    Raises:
        InvalidArgumentError: no grid, a layer, query position or sink cell out of range, a query
            or layer the executor did not record.
        MissingActivationsError: a cache without the attention patterns."""
    source, model, grid = _legacy_call("image_attention", source, legacy, grid)
    rows_from = row_source(source, model, call="image_attention(run_or_cache, grid=..., query_positions=...)")
    grid = image_grid_of(source, grid)
    chosen = check_layers(rows_from.model, layers)
    queries = check_positions(rows_from.n_positions, query_positions)
    check_positions(rows_from.n_positions, grid.positions)
    rows = rows_from.attention_rows(Reads(tuple(chosen), tuple(queries), tuple(grid.positions)))
    return _from_rows(chosen, queries, grid, rows, sink_cells)


def _legacy_call(name: str, source: object, legacy: tuple, grid: ImageGrid | None) -> tuple[object, object, ImageGrid | None]:
    """(source, model, grid) of the old positional form `name(cache, model, grid, ...)`, warning."""
    if not legacy:
        return source, None, grid
    if len(legacy) > 2:
        raise TypeError(f"{name}() takes the run or cache and keyword options; got {1 + len(legacy)} positional arguments.")
    deprecated(f"{name}(cache, model, grid, ...) is deprecated: call {name}(run_or_cache, grid=grid, ...) "
               "(the model is the cache's own).", stacklevel=4)
    model = legacy[0]
    if len(legacy) == 2:
        if grid is not None:
            raise TypeError(f"{name}() got the grid both positionally and as grid=.")
        grid = legacy[1]
    return source, model, grid


def _from_rows(
    layers: list[int], queries: list[int], grid: ImageGrid, rows: Float[Tensor, "layer head query cell"], sink_cells: Sequence[int]
) -> ImageAttention:
    keep = torch.ones(len(grid.positions), dtype=torch.bool)
    for cell in sink_cells:
        if not 0 <= cell < len(keep):
            raise InvalidArgumentError(f"sink cell {cell} is outside the grid of {len(keep)} cells.")
        keep[cell] = False
    rows = rows.double()
    masked = rows * keep
    maps = masked / masked.sum(-1, keepdim=True).clamp_min(1e-300)
    return ImageAttention(layers, queries, grid, rows.sum(-1).float(), maps.float(), region_metrics(masked, grid))


@dataclass
class Hotspot(Result):
    """A connected region of cells with more than `threshold_factor` times the uniform share."""

    cells: list[int]
    mass: float
    centre: tuple[float, float]


def hotspots(q: Float[Tensor, " cell"], grid: ImageGrid, *, threshold_factor: float = 3.0) -> list[Hotspot]:
    """Cells with q > threshold_factor / N, grouped into 4-connected regions (scipy.ndimage.label
    with its default cross-shaped structure), largest mass first (ties: raster order of the
    region's first cell)."""

    n = grid.rows * grid.cols
    if q.shape != (n,):
        raise InvalidArgumentError(f"A map of {n} cells is needed; got shape {tuple(q.shape)}.")
    q = q.double() / q.double().sum()
    hot = (q > threshold_factor / n).numpy().reshape(grid.rows, grid.cols)
    labels, count = ndimage.label(hot)  # 4-connectivity; components numbered in raster order
    flat = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    one_hot = (flat[None, :] == torch.arange(1, count + 1)[:, None]).double()  # (region, cell)
    masses = one_hot @ q
    centres = (one_hot * q) @ grid.coordinates / masses[:, None].clamp_min(1e-300)
    found = [
        Hotspot(torch.nonzero(one_hot[i]).flatten().tolist(), float(masses[i]), (float(centres[i, 0]), float(centres[i, 1])))
        for i in range(count)
    ]
    return sorted(found, key=lambda spot: -spot.mass)


def jensen_shannon_distance(p: Float[Tensor, "... n"], q: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """√(JSD(p, q) / ln 2) (scipy.spatial.distance.jensenshannon, base 2): a metric in [0, 1]
    between distributions; p and q are renormalised over the last axis and broadcast."""

    p_np, q_np = (x.detach().double().cpu().numpy() for x in torch.broadcast_tensors(p, q))

    return torch.from_numpy(np.asarray(jensenshannon(p_np, q_np, base=2, axis=-1))).float()


@dataclass
class HeadClusters:  # not a Result: its `labels` field would shadow Result.labels()
    """Heads (flattened over any leading layer dimension, row-major) grouped by the distance of
    their image maps. `scores[k]` is the mean silhouette of the cut into k clusters."""

    distance: Float[Tensor, "head head"]
    labels: list[int]
    silhouette: float  # mean silhouette of the chosen cut; NaN for a single cluster
    scores: dict[int, float] = field(default_factory=dict)
    metric: str = "jensenshannon"

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels))


def head_distances(maps: Float[Tensor, "head cell"], metric: str = "jensenshannon") -> Float[Tensor, "head head"]:
    """Pairwise distances between head maps: "jensenshannon" (√(JSD / ln 2), in [0, 1], as
    scipy.spatial.distance.jensenshannon(p, q, base=2); maps renormalised) or "cosine" (1 − cos, in
    [0, 2], scipy.spatial.distance.pdist).

    JS is computed from JSD(p, q) = ln 2 + ½ Σ p ln p + ½ Σ q ln q − ½ Σ (p + q) ln (p + q) (nats;
    Lin 1991), float64: the per-head terms once, the pair term as one logarithm per pair and cell
    over the upper triangle (heads² / 2 × cells logarithms; 1,024 heads × 576 cells ≈ 3 · 10⁸,
    1.5–2.3 s at load 7–13 on this project's 2-core machine). scipy's pdist(x, "jensenshannon") measured
    3.5–11 s there (load 1–11) on the same 1,024 × 576 maps. Equal to scipy's jensenshannon to
    ≤ 1e-7 as measured (tested at 1e-6 on every pair, tests/test_libraries.py).

    Raises InvalidArgumentError for an unknown metric, negative maps or a map without mass."""

    if metric not in ("jensenshannon", "cosine"):
        raise InvalidArgumentError(f"metric must be 'jensenshannon' or 'cosine'; got {metric!r}.")
    x = maps.detach().double().cpu().numpy()
    if (x < 0).any() or not (x.sum(-1) > 0).all():
        raise InvalidArgumentError("Head maps must be non-negative with some mass on the grid.")
    if metric == "cosine":
        return torch.from_numpy(np.clip(squareform(pdist(x, "cosine")), 0.0, None))
    return torch.from_numpy(_jensen_shannon_matrix(x / x.sum(-1, keepdims=True)))


def _jensen_shannon_matrix(p: "np.ndarray") -> "np.ndarray":
    """√(JSD / ln 2) between every pair of rows of p (rows sum to 1), float64 (see head_distances).
    numpy row by row over the upper triangle, rows shared among up to 4 threads (numpy's ufuncs
    release the GIL): on a shared 2-core machine this ran 2–10× faster than torch's OpenMP ops."""


    n = p.shape[0]
    tiny = np.finfo(np.float64).tiny  # s ln s → 0 as s → 0: ln(max(s, tiny)) keeps 0 · ln 0 = 0
    own = (p * np.log(np.maximum(p, tiny))).sum(-1)  # Σ p ln p per head
    positive = bool((p > 0).all())  # softmax maps: no zero cell, no clamping pass needed
    pair = np.zeros((n, n))

    def rows(worker: int, workers: int) -> None:
        sums, logs = np.empty_like(p), np.empty_like(p)
        for i in range(worker, n - 1, workers):  # interleaved rows balance the triangle
            s, log_s = np.add(p[i + 1 :], p[i], out=sums[: n - i - 1]), logs[: n - i - 1]
            np.log(s if positive else np.maximum(s, tiny, out=log_s), out=log_s)
            pair[i, i + 1 :] = np.vecdot(s, log_s)  # Σ_c s ln s per pair

    workers = max(1, min(4, os.cpu_count() or 1, n // 64))
    if workers == 1:
        rows(0, 1)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(rows, range(workers), [workers] * workers))
    pair += pair.T
    jsd = math.log(2) + 0.5 * (own[:, None] + own[None, :]) - 0.5 * pair
    np.fill_diagonal(jsd, 0.0)
    return np.sqrt(np.clip(jsd, 0.0, None) / math.log(2))


def cluster_heads(
    maps: Float[Tensor, "... cell"],
    *,
    n_clusters: int | None = None,
    metric: str = "jensenshannon",
    max_clusters: int = 10,
) -> HeadClusters:
    """Average-linkage (UPGMA) agglomerative clustering of heads (scipy.cluster.hierarchy) on the
    pairwise `head_distances`; with `n_clusters=None` the number of clusters k ∈ [2,
    min(max_clusters, heads − 1)] with the highest mean silhouette (sklearn.metrics.silhouette_score
    on the same precomputed distance, Rousseeuw 1987) is chosen. `maps` may be (head, cell) or
    (layer, head, cell): all L × H heads are clustered together. Labels are numbered in order of
    first appearance."""

    flat = maps.reshape(-1, maps.shape[-1])
    n = flat.shape[0]
    if n_clusters is not None and not 1 <= n_clusters <= n:
        raise InvalidArgumentError(f"n_clusters must be between 1 and the number of heads ({n}); got {n_clusters}.")
    if max_clusters < 2:
        raise InvalidArgumentError(f"max_clusters must be at least 2; got {max_clusters}.")
    distance = head_distances(flat, metric)
    if n == 1:
        return HeadClusters(distance.float(), [0], float("nan"), {}, metric)
    tree = linkage(squareform(distance.numpy(), checks=False), method="average")

    def cut(k: int) -> list[int]:
        raw = fcluster(tree, k, criterion="maxclust").tolist()
        order = {label: index for index, label in enumerate(dict.fromkeys(raw))}
        return [order[label] for label in raw]

    candidates = [n_clusters] if n_clusters is not None else list(range(2, min(max_clusters, n - 1) + 1)) or [min(2, n)]
    cuts = {k: cut(k) for k in candidates}
    scores = {k: silhouette(distance, labels) for k, labels in cuts.items()}
    best = n_clusters if n_clusters is not None else max(candidates, key=lambda k: (scores[k], -k))
    return HeadClusters(distance.float(), cuts[best], scores[best], scores, metric)


def silhouette(distance: Float[Tensor, "n n"], labels: Sequence[int]) -> float:
    """Mean silhouette (b − a) / max(a, b) over points (sklearn.metrics.silhouette_score, metric
    "precomputed"); a point alone in its cluster scores 0; NaN with fewer than two clusters, 0 when
    every point is alone."""
    from sklearn.metrics import silhouette_score  # scikit-learn takes ~1.5 s to import: loaded when used

    n_labels = len(set(labels))
    if n_labels < 2:
        return float("nan")
    if n_labels == len(labels):
        return 0.0
    matrix = distance.detach().double().cpu().numpy().copy()
    matrix[range(len(matrix)), range(len(matrix))] = 0.0
    return float(silhouette_score(matrix, list(labels), metric="precomputed"))


@dataclass
class VisionRollout(Result):
    """Rollout from query positions through the language model into the image block, then through
    the vision encoder onto the image patches.

    `maps[q]` sums to 1 over the vision patches, row-major over `patch_shape` (rows × cols of
    patches: `grid`'s shape for LLaVA, `merge_size` times finer for Qwen-VL); `image_mass[q]` is
    the share of the query's language-model rollout that lands on the image block.
    """

    query_positions: list[int]
    grid: ImageGrid
    patch_shape: tuple[int, int]
    maps: Float[Tensor, "query patch"]
    image_mass: Float[Tensor, " query"]
    vision_layers: list[int]

    units = {"maps": "fraction", "image_mass": "fraction"}


def vision_rollout(
    source: object,
    *legacy: object,
    grid: ImageGrid | None = None,
    query_positions: Sequence[int],
    head_fusion: str = "mean",
    residual_weight: float = 0.5,
) -> VisionRollout:
    """The language model's rollout restricted to the image tokens, times the vision encoder's
    rollout mapped back to patches (REFERENCES, "Attention rollout"; the same head fusion and
    residual weight in both).

    `source` supplies the language model's rollout rows and the vision tower's hooks
    (`mechvis.analysis.rows`): a Run, Trace or ActivationCache with the attention patterns and
    `vision_rollout_hooks(model)`, or `analyse_long`'s result with rollout rows for the queries
    and those hooks captured. `grid` defaults to the run's image grid.

    LLaVA (one image token per patch): the encoder layers the projector sees (the penultimate
    layer for `vision_feature_layer = -2`), CLS dropped as the "default" feature selection does.
    Qwen2-VL / Qwen2.5-VL: every vision block (the merger reads the last), with Qwen2.5-VL's
    windowed blocks in their window order; each image token is the mean of its merge_size ×
    merge_size patches' rollout rows, as the merger concatenates exactly those patches. The
    vision patterns are recomputed from the cached pixels with the tower's own query/key
    projections and 2-D rotary embedding (its attention exposes no pattern hook).

    The old form `vision_rollout(cache, model, grid, ...)` still works for one release and warns.

    Raises:
        InvalidArgumentError: a layout not mapped yet, a grid whose merge size is not the tower's,
            a query position out of range or without rollout rows.
        MissingActivationsError: the patterns or vision-tower hooks are missing.
    """
    source, model, grid = _legacy_call("vision_rollout", source, legacy, grid)
    rows_from = row_source(source, model, call="vision_rollout(run_or_cache, grid=..., query_positions=...)")
    grid = image_grid_of(source, grid)
    model = rows_from.model
    visual = _qwen_visual(model)
    if visual is None:
        _check_llava_layout(model, grid)
    elif grid.merge_size != visual.spatial_merge_size:
        raise InvalidArgumentError(f"This grid merges {grid.merge_size} × {grid.merge_size} patches; the vision tower merges {visual.spatial_merge_size}.")
    if head_fusion not in ("mean", "max", "min"):
        raise InvalidArgumentError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}.")
    residual_weight = check_real(residual_weight, "residual_weight", low=0.0, high=1.0)
    queries = check_positions(rows_from.n_positions, query_positions)
    to_image = rows_from.rollout_rows(queries, head_fusion, residual_weight).double()[:, list(grid.positions)]  # (query, image token)
    if visual is None:
        onto_patches, vision_layers = _llava_onto_patches(rows_from.hooks, model, grid, to_image, head_fusion, residual_weight)
        patch_shape = (grid.rows, grid.cols)
    else:
        onto_patches, vision_layers = _qwen_onto_patches(rows_from.hooks, visual, grid, to_image, head_fusion, residual_weight)
        patch_shape = (grid.rows * grid.merge_size, grid.cols * grid.merge_size)
    maps = onto_patches / onto_patches.sum(-1, keepdim=True)
    return VisionRollout(queries, grid, patch_shape, maps.float(), to_image.sum(-1).float(), vision_layers)


def vision_rollout_hooks(model: "TransformerBridge") -> list[str]:
    """The vision-tower hooks `vision_rollout` reads besides the language model's attention
    patterns, for `names_filter`: LLaVA's encoder-layer patterns up to its feature layer, or
    Qwen-VL's cached pixel patches. Empty for a text-only model or a layout it does not map."""
    config = getattr(model.original_model, "config", None)
    if getattr(config, "vision_config", None) is None:
        return []
    if _qwen_visual(model) is not None:
        return ["vision_encoder.hook_in"]
    feature_layer = getattr(config, "vision_feature_layer", None)
    if not isinstance(feature_layer, int):
        return []
    n_vision = config.vision_config.num_hidden_layers
    return [f"vision_encoder.encoder_layers.{i}.attn.hook_pattern" for i in range(feature_layer % (n_vision + 1))]


def _check_llava_layout(model: "TransformerBridge", grid: ImageGrid) -> None:
    config = model.original_model.config
    feature_layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    tiled = bool(getattr(config, "image_grid_pinpoints", None))  # LLaVA-NeXT / OneVision: tiles, not one patch grid
    if getattr(config, "vision_config", None) is None or not isinstance(feature_layer, int) or grid.merge_size != 1 or strategy != "default" or tiled:
        raise InvalidArgumentError(
            "vision_rollout maps LLaVA-style encoders (one image token per patch, a single "
            "vision_feature_layer) and Qwen-VL's merged patches; this model's layout is not mapped yet."
        )


def _llava_onto_patches(
    cache: "ActivationCache", model: "TransformerBridge", grid: ImageGrid, to_image: Tensor, head_fusion: str, residual_weight: float
) -> tuple[Float[Tensor, "query patch"], list[int]]:
    config = model.original_model.config
    n_vision = config.vision_config.num_hidden_layers
    last = config.vision_feature_layer % (n_vision + 1)  # hidden_states index: 0 = embeddings, i = after layer i − 1
    vision_layers = list(range(last))
    names = [f"vision_encoder.encoder_layers.{i}.attn.hook_pattern" for i in vision_layers]
    vision = rollout_matrix(torch.stack([activation(cache, name) for name in names]), head_fusion, residual_weight)
    offset = vision.shape[-1] - grid.rows * grid.cols  # the CLS position(s) before the patches
    if offset < 0:
        raise InvalidArgumentError(f"The vision encoder has {vision.shape[-1]} positions for {grid.rows * grid.cols} image tokens.")
    # Image token i is vision position offset + i (the projector drops CLS); CLS's share is dropped.
    return (to_image @ vision[offset:])[:, offset:], vision_layers


def _qwen_visual(model: "TransformerBridge") -> "torch.nn.Module | None":
    """Qwen-VL's vision tower (patch embedding, blocks, 2 × 2 merger), or None for other models."""
    visual = getattr(getattr(model.original_model, "model", None), "visual", None)
    return visual if visual is not None and hasattr(visual, "spatial_merge_size") and hasattr(visual, "blocks") else None


def _qwen_onto_patches(
    cache: "ActivationCache", visual: "torch.nn.Module", grid: ImageGrid, to_image: Tensor, head_fusion: str, residual_weight: float
) -> tuple[Float[Tensor, "query patch"], list[int]]:

    merge = grid.merge_size
    unit = merge * merge
    rows, cols = grid.rows * merge, grid.cols * merge
    require_hooks(cache, ["vision_encoder.hook_in"])
    pixels = cache["vision_encoder.hook_in"]  # (patch, features): Qwen-VL's tower has no batch dimension
    if pixels.shape[0] != rows * cols:
        raise InvalidArgumentError(f"The cached vision input has {pixels.shape[0]} patches; one image of {rows} × {cols} patches was expected.")
    grid_thw = torch.tensor([[1, rows, cols]], device=pixels.device)
    factors: list[Tensor] = []

    def record(module: "torch.nn.Module", args: tuple, kwargs: dict) -> None:
        attention = getattr(module, "original_component", module)
        rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
        hidden = args[0] if args else kwargs["hidden_states"]
        qkv = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1)
        query, key = rotary(qkv[:, 0], qkv[:, 1], *kwargs["position_embeddings"])
        scores = torch.einsum("qhd,khd->hqk", query.float(), key.float()) * attention.scaling
        # The attention block (the image, or one window of it) of each position, from the block ends.
        ends = kwargs["cu_seqlens"][1:].to(hidden.device)
        block = torch.searchsorted(ends, torch.arange(hidden.shape[0], device=hidden.device), right=True)
        scores = scores.masked_fill(block[:, None] != block[None, :], float("-inf"))
        factors.append(augmented_attention(scores.softmax(-1), head_fusion, residual_weight))

    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in visual.blocks]
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    order = torch.arange(rows * cols, device=pixels.device)  # sequence position → patch index in merge-block order
    if hasattr(visual, "window_size"):  # Qwen2.5-VL runs its blocks over merge units in window order
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        order = (window_index.to(pixels.device)[:, None] * unit + torch.arange(unit, device=pixels.device)).flatten()
    restore = torch.argsort(order)
    vision = rollout_product(torch.stack(factors))[restore][:, restore]  # in merge-block order
    # Image token j is merge unit j: patches j·unit … j·unit + unit − 1, concatenated by the merger.
    per_token = vision.reshape(grid.rows * grid.cols, unit, -1).mean(1)
    onto_patches = to_image @ per_token
    # Merge-block order (block row, block col, row in block, col in block) → raster order.
    raster = onto_patches.reshape(-1, grid.rows, grid.cols, merge, merge).permute(0, 1, 3, 2, 4)
    return raster.reshape(onto_patches.shape[0], rows * cols), list(range(len(visual.blocks)))


@dataclass
class Comparison(Result):
    """Image-attention metrics of two conditions (e.g. an image with and without an object), each
    averaged over layers, heads and queries, with their differences (b − a); `distances` between
    the two conditions' mean maps (grid cells)."""

    a: ImageAttention
    b: ImageAttention
    table: dict[str, tuple[float, float, float]]  # metric → (a, b, b − a)
    distances: dict[str, float] = field(default_factory=dict)


def compare(attention_a: ImageAttention, attention_b: ImageAttention) -> Comparison:
    """The metric table of two image_attention results over grids of the same shape: the region
    metrics, the mass of the named regions (quadrants, centre), the geometry of the mean map (50 % /
    90 % mass areas, 90 % convex hull, in cells), I(quadrant; query) in nats; and the earth mover's
    and Hausdorff (90 % cells) distances between the two mean maps."""

    if (attention_a.grid.rows, attention_a.grid.cols) != (attention_b.grid.rows, attention_b.grid.cols):
        raise InvalidArgumentError("The two conditions need image grids of the same shape to be compared.")
    grid = attention_a.grid
    quadrants = grid_regions(grid.rows, grid.cols, (min(2, grid.rows), min(2, grid.cols)))

    def mean_map(x: ImageAttention) -> Tensor:
        return x.maps.double().mean(dim=(0, 1, 2))

    def information(x: ImageAttention) -> float:
        return region_token_information(x.maps.double().mean(dim=(0, 1)), regions=quadrants).mutual_information

    rows = [
        ("image mass", lambda x: x.image_mass),
        ("entropy (nats)", lambda x: x.metrics.entropy),
        ("normalised entropy", lambda x: x.metrics.normalised_entropy),
        ("Gini", lambda x: x.metrics.gini),
        ("k90 / N", lambda x: x.metrics.k90_fraction),
        ("peak / mean", lambda x: x.metrics.peak_to_mean),
        ("spatial variance (cells²)", lambda x: x.metrics.spatial_variance),
        ("centre row", lambda x: x.metrics.centre[..., 0]),
        ("centre col", lambda x: x.metrics.centre[..., 1]),
    ]
    rows += [(f"{name} mass", lambda x, name=name: region_mass(x.maps, grid, name).mass) for name in ("top-left", "top-right", "bottom-left", "bottom-right", "centre") if name in NAMED_REGIONS]
    rows += [
        ("50% mass area (cells)", lambda x: torch.tensor(float(map_geometry(mean_map(x), grid).contour_50.cells))),
        ("90% mass area (cells)", lambda x: torch.tensor(float(map_geometry(mean_map(x), grid).contour_90.cells))),
        ("90% hull area (cells²)", lambda x: torch.tensor(map_geometry(mean_map(x), grid).hull_90.cells)),
        ("I(quadrant; query) (nats)", lambda x: torch.tensor(information(x))),
    ]
    values = {}
    for name, get in rows:
        first, second = get(attention_a).float().mean().item(), get(attention_b).float().mean().item()
        values[name] = (first, second, second - first)
    first_map, second_map = mean_map(attention_a), mean_map(attention_b)
    distances = {
        "earth mover's distance (cells)": earth_movers_distance(first_map, second_map, grid).cells,
        "Hausdorff distance, 90% cells (cells)": hausdorff_distance(first_map, second_map, grid).cells,
        "Jensen–Shannon distance": float(jensen_shannon_distance(first_map, second_map)),
    }
    return Comparison(attention_a, attention_b, values, distances)


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "VisualInformation": "mechvis.studies.vision:VisualInformation",
    "stream_image_attention": "mechvis.studies.streamed:stream_image_attention",
    "visual_information": "mechvis.studies.vision:visual_information",
})
