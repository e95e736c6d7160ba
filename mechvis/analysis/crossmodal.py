"""How close the image tokens' hidden states are to the text tokens', layer by layer.

At layer ℓ (the residual stream after block ℓ), with image-token states x_i and text-token states
y_j, each L2-normalised (x̂ = x / ‖x‖):
- alignment(ℓ) = mean over all pairs (i, j) of cos(x_i, y_j) = x̄̂ · ȳ̂ (the centroids of the
  normalised states), in [−1, 1];
- modality_gap(ℓ) = ‖x̄̂ − ȳ̂‖, the distance between the two centroids on the unit sphere (Liang
  et al. 2022, "Mind the Gap", NeurIPS), in [0, 2] (unitless: the states are normalised);
- centroid_distance(ℓ) = ‖x̄ − ȳ‖ between the raw centroids, in the residual stream's units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._deprecation import deprecated
from mechvis._validation import activation, check_layers, check_positions
from mechvis.analysis.rows import image_grid_of, row_source
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.types import ImageGrid

if TYPE_CHECKING:
    pass


@dataclass
class CrossModal(Result):
    """Per-layer alignment and modality gap between image-token and text-token hidden states."""

    layers: list[int]
    image_positions: list[int]
    text_positions: list[int]
    alignment: Float[Tensor, " layer"]
    modality_gap: Float[Tensor, " layer"]
    centroid_distance: Float[Tensor, " layer"]

    units = {"alignment": "cosine", "modality_gap": "cosine", "centroid_distance": "residual-stream norm units"}


def cross_modal(
    source: object,
    *legacy: object,
    grid: ImageGrid | None = None,
    text_positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> CrossModal:
    """Alignment and modality gap (module docstring) from `blocks.ℓ.hook_resid_post` of `source`:
    a Run, Trace or ActivationCache, or `analyse_long`'s result with those layers' residual
    streams kept (`keep_residuals`; `mechvis.analysis.rows`). `grid` defaults to the run's image
    grid. Text positions default to every position outside the image except position 0 (the
    attention sink, whose state is an outlier in norm and direction).

    The old form `cross_modal(cache, model, grid, ...)` still works for one release and warns.

    Raises:
        InvalidArgumentError: no grid, bad layers or positions, text positions inside the image.
        MissingActivationsError: a residual stream that is not there."""
    model = None
    if legacy:
        if len(legacy) > 2:
            raise TypeError(f"cross_modal() takes the run or cache and keyword options; got {1 + len(legacy)} positional arguments.")
        deprecated("cross_modal(cache, model, grid, ...) is deprecated: call cross_modal(run_or_cache, grid=grid, ...) "
                   "(the model is the cache's own).")
        model, grid = legacy[0], (legacy[1] if len(legacy) == 2 else grid)
    rows_from = row_source(source, model, call="cross_modal(run_or_cache, grid=...)")
    grid = image_grid_of(source, grid)
    chosen = check_layers(rows_from.model, layers)
    states = torch.stack([activation(rows_from.hooks, f"blocks.{layer}.hook_resid_post") for layer in chosen]).double()
    n_positions = states.shape[1]
    image = check_positions(n_positions, grid.positions)
    if text_positions is None:
        image_set = set(image)
        text = [position for position in range(1, n_positions) if position not in image_set]
    else:
        text = check_positions(n_positions, text_positions)
    if not text or set(text) & set(image):
        raise InvalidArgumentError("Text positions must be non-empty and outside the image block.")
    unit = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    image_centre, text_centre = unit[:, image].mean(1), unit[:, text].mean(1)
    return CrossModal(
        chosen, image, text,
        alignment=torch.einsum("ld,ld->l", image_centre, text_centre).float(),
        modality_gap=(image_centre - text_centre).norm(dim=-1).float(),
        centroid_distance=(states[:, image].mean(1) - states[:, text].mean(1)).norm(dim=-1).float(),
    )
