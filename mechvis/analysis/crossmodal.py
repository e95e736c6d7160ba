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

from mechvis._validation import analysis_form, activation, check_layers, check_positions
from mechvis.errors import InvalidArgumentError
from mechvis.types import ImageGrid
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class CrossModal(Result):
    """Per-layer alignment and modality gap between image-token and text-token hidden states."""

    units = {'alignment': 'cosine similarity', 'modality_gap': 'distance on the unit sphere (unitless)', 'centroid_distance': 'residual-stream units'}

    layers: list[int]
    image_positions: list[int]
    text_positions: list[int]
    alignment: Float[Tensor, " layer"]
    modality_gap: Float[Tensor, " layer"]
    centroid_distance: Float[Tensor, " layer"]


@analysis_form('cross_modal(run_or_cache, *, grid, text_positions=None, layers=None)', options=('grid',))
def cross_modal(
    cache: "ActivationCache",
    model: "TransformerBridge",
    grid: ImageGrid,
    *,
    text_positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> CrossModal:
    """Alignment and modality gap (module docstring) from the cached `blocks.ℓ.hook_resid_post`.
    Text positions default to every position outside the image except position 0 (the attention
    sink, whose state is an outlier in norm and direction)."""
    chosen = check_layers(model, layers)
    states = torch.stack([activation(cache, f"blocks.{layer}.hook_resid_post") for layer in chosen]).double()
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
