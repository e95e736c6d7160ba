"""Attention inside a region of the image: the mass a map puts on a box given in normalised image
coordinates, and how that compares with the box's share of the image (1 = no preference).

Coordinates: (top, left, bottom, right) with 0 ≤ top < bottom ≤ 1 and 0 ≤ left < right ≤ 1, as
fractions of the image's height and width. Cell (r, c) of a rows × cols grid covers
[r/rows, (r+1)/rows) × [c/cols, (c+1)/cols); a cell cut by the box's edge counts with the fraction
of its area inside the box, so the mass of a box is exact for a map that is uniform within cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.types import ImageGrid

Box = tuple[float, float, float, float]

NAMED_REGIONS: dict[str, Box] = {
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.0, 0.5, 0.5, 1.0),
    "bottom-left": (0.5, 0.0, 1.0, 0.5),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "centre": (0.25, 0.25, 0.75, 0.75),
    "top": (0.0, 0.0, 0.5, 1.0),
    "bottom": (0.5, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 1.0, 0.5),
    "right": (0.0, 0.5, 1.0, 1.0),
}


@dataclass
class RegionMass(Result):
    """Attention on a box. mass = Σ_cells w_c q_c (q renormalised over the grid, w_c the fraction
    of cell c inside the box), in [0, 1]; area = Σ w_c / N, the box's share of the image;
    enrichment = mass / area (1: as much as a uniform map, > 1: the box is preferred)."""

    units = {'mass': 'probability', 'area': 'fraction (of the image)', 'enrichment': 'ratio (1 = uniform)'}

    box: Box
    mass: Float[Tensor, "..."]
    area: float
    enrichment: Float[Tensor, "..."]

    units = {"mass": "probability", "area": "fraction", "enrichment": "ratio"}


def resolve_box(box: Box | str) -> Box:
    """A named region's box, or the box itself after checking it lies in [0, 1] and is not empty."""
    if isinstance(box, str):
        if box not in NAMED_REGIONS:
            raise InvalidArgumentError(f"Unknown region {box!r}; choose from {sorted(NAMED_REGIONS)} or give (top, left, bottom, right).")
        return NAMED_REGIONS[box]
    try:
        top, left, bottom, right = (float(value) for value in box)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"A box is (top, left, bottom, right) in [0, 1]; got {box!r}.") from error
    if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
        raise InvalidArgumentError(
            f"A box needs 0 ≤ top < bottom ≤ 1 and 0 ≤ left < right ≤ 1 (fractions of the image); got {box!r}."
        )
    return (top, left, bottom, right)


def box_weights(grid: ImageGrid, box: Box | str) -> Float[Tensor, " cell"]:
    """Fraction of each cell's area inside the box (row-major over the grid), in [0, 1]."""
    top, left, bottom, right = resolve_box(box)

    def overlap(n: int, start: float, end: float) -> Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        return ((edges[1:].clamp(max=end) - edges[:-1].clamp(min=start)).clamp_min(0) * n)

    return torch.einsum("r,c->rc", overlap(grid.rows, top, bottom), overlap(grid.cols, left, right)).flatten()


def region_mass(maps: Float[Tensor, "... cell"], grid: ImageGrid, box: Box | str) -> RegionMass:
    """Mass of each map (leading dims kept; renormalised over the grid) inside `box` — a
    (top, left, bottom, right) tuple in normalised image coordinates or a name of NAMED_REGIONS.

    Raises InvalidArgumentError for a box outside [0, 1], maps of another grid size, or a map
    without mass."""
    n = grid.rows * grid.cols
    if maps.shape[-1] != n:
        raise InvalidArgumentError(f"Maps have {maps.shape[-1]} cells; the grid has {n}.")
    weights = box_weights(grid, box)
    q = maps.detach().double().clamp_min(0)
    total = q.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise InvalidArgumentError("A map has no mass on the image; its region mass is undefined.")
    mass = (q / total) @ weights
    area = float(weights.sum() / n)
    return RegionMass(resolve_box(box), mass.float(), area, (mass / area).float())


def named_region_masses(maps: Float[Tensor, "... cell"], grid: ImageGrid) -> dict[str, RegionMass]:
    """region_mass for every region of NAMED_REGIONS (quadrants, centre, halves)."""
    return {name: region_mass(maps, grid, name) for name in NAMED_REGIONS}
