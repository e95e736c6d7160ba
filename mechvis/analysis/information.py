"""Mutual information between where generated tokens look and which token is generated.

Definition (in nats). Over a trace with generated tokens t = 1 … T and image maps q_t (each
token's attention renormalised over the image cells, from one layer or averaged over layers and
heads), the joint distribution of a region R (a cell, or a group of cells) and a token T is
    p(r, t) = w_t · q_t(r),   w_t = 1/T (each token counts once) or ∝ the token's image mass,
and I(R; T) = H(R) − H(R | T) = Σ_t w_t KL(q_t ‖ q̄), q̄ = Σ_t w_t q_t. It is 0 when every token
looks at the same map, and equals H(R) when each token looks at one region only (a deterministic
token → region mapping); 0 ≤ I ≤ min(H(R), H(T)). This is the exact information of the stated
distribution, not an estimate, so it needs no bias correction.

When regions are *sampled* — e.g. the argmax region of each token against a discrete label of the
token — the plug-in estimate from n samples is biased upwards; `discrete_mutual_information`
applies the Miller–Madow correction (Miller 1955; Paninski 2003): each entropy gains
(m − 1) / (2n) with m its number of occupied bins, so
I_MM = I_plugin + [(m_X − 1) + (m_Y − 1) − (m_XY − 1)] / (2n), clipped at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from scipy.special import rel_entr
from torch import Tensor

from mechvis._validation import check_integer, shown
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result


@dataclass
class RegionTokenInformation(Result):
    """I(R; T) in nats with its parts: H(R), H(R | T), and normalised = I / H(R) in [0, 1]."""

    units = {'mutual_information': 'nats', 'region_entropy': 'nats', 'conditional_entropy': 'nats', 'normalised': 'fraction', 'joint': 'probability'}

    mutual_information: float
    region_entropy: float
    conditional_entropy: float
    normalised: float
    joint: Float[Tensor, "token region"]


def region_token_information(
    maps: Float[Tensor, "token cell"],
    *,
    regions: Int[Tensor, " cell"] | None = None,
    weights: Float[Tensor, " token"] | None = None,
) -> RegionTokenInformation:
    """I(R; T) of the joint p(r, t) = w_t q_t(r) (module docstring). `regions` labels each cell
    with a region id 0 … K − 1 (default: every cell is its own region); `weights` are the tokens'
    weights w_t (default uniform; e.g. the image mass per token), renormalised. The mutual
    information is Σ rel_entr(p(r, t), p(r) p(t)) (scipy.special.rel_entr: x log(x / y), 0 at x = 0)."""

    if maps.ndim != 2 or maps.shape[0] < 1:
        raise InvalidArgumentError(f"Expected (token, cell) maps; got shape {tuple(maps.shape)}.")
    q = maps.detach().double().clamp_min(0)
    totals = q.sum(-1, keepdim=True)
    if (totals <= 0).any():
        raise InvalidArgumentError("A token's map has no mass on the image.")
    q = q / totals
    if regions is not None:
        regions = torch.as_tensor(regions).long()
        if regions.shape != (q.shape[1],) or (regions < 0).any():
            raise InvalidArgumentError(f"regions must label each of the {q.shape[1]} cells with an id ≥ 0.")
        q = torch.zeros(q.shape[0], int(regions.max()) + 1, dtype=q.dtype).index_add_(1, regions, q)
    w = torch.full((q.shape[0],), 1.0 / q.shape[0], dtype=q.dtype) if weights is None else torch.as_tensor(weights).double()
    if w.shape != (q.shape[0],) or (w < 0).any() or not w.sum() > 0:
        raise InvalidArgumentError(f"weights must be {q.shape[0]} non-negative numbers, not all 0.")
    joint = (w / w.sum())[:, None] * q
    table = joint.numpy()
    outer = table.sum(1, keepdims=True) * table.sum(0, keepdims=True)
    information = max(float(rel_entr(table, outer).sum()), 0.0)
    region_entropy = float(torch.special.entr(joint.sum(0)).sum())
    return RegionTokenInformation(
        information, region_entropy, region_entropy - information,
        information / region_entropy if region_entropy > 0 else 0.0, joint.float(),
    )


@dataclass
class DiscreteInformation(Result):
    """Mutual information of paired discrete samples, in nats: plug-in and Miller–Madow."""

    units = {'plug_in': 'nats', 'miller_madow': 'nats', 'n': 'samples'}

    plug_in: float
    miller_madow: float
    n: int


def discrete_mutual_information(x: Sequence[int], y: Sequence[int]) -> DiscreteInformation:
    """I(X; Y) from n paired samples: the plug-in estimate (sklearn.metrics.mutual_info_score) and
    its Miller–Madow bias correction (module docstring)."""
    from sklearn.metrics import mutual_info_score  # scikit-learn takes ~1.5 s to import: loaded when used

    x, y = list(x), list(y)
    if len(x) != len(y) or not x:
        raise InvalidArgumentError(f"Need two equally long, non-empty samples; got {len(x)} and {len(y)}.")
    n = len(x)
    plug_in = max(float(mutual_info_score(x, y)), 0.0)
    bins_x, bins_y, bins_xy = len(set(x)), len(set(y)), len(set(zip(x, y)))
    corrected = plug_in + ((bins_x - 1) + (bins_y - 1) - (bins_xy - 1)) / (2 * n)
    return DiscreteInformation(plug_in, max(corrected, 0.0), n)


def grid_regions(rows: int, cols: int, blocks: tuple[int, int] = (2, 2)) -> Int[Tensor, " cell"]:
    """Region ids of a rows × cols grid cut into blocks[0] × blocks[1] equal blocks (row-major),
    e.g. (2, 2): the quadrants."""
    rows, cols = check_integer(rows, "rows", low=1), check_integer(cols, "cols", low=1)
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) != 2:
        raise InvalidArgumentError(f"blocks must be a pair (row blocks, column blocks) such as (2, 2); got {shown(blocks)}.")
    blocks = (check_integer(blocks[0], "blocks[0]", low=1), check_integer(blocks[1], "blocks[1]", low=1))
    if blocks[0] < 1 or blocks[1] < 1 or blocks[0] > rows or blocks[1] > cols:
        raise InvalidArgumentError(f"Cannot cut a {rows} × {cols} grid into {blocks} blocks.")
    row_block = torch.arange(rows) * blocks[0] // rows
    col_block = torch.arange(cols) * blocks[1] // cols
    return (row_block[:, None] * blocks[1] + col_block[None, :]).flatten()


