"""Activation magnitudes: L2 norm per layer per token and its layer-to-layer change rate, and
per-layer distribution statistics of MLP and attention activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._validation import analysis_form, stacked
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge

ActivationKind = Literal["resid_post", "attn_out", "mlp_out", "mlp_post"]
_HOOKS = {
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "mlp_post": "blocks.{}.mlp.hook_post",
}


def activation_hook_names(model: "TransformerBridge", kind: ActivationKind) -> list[str]:
    if kind not in _HOOKS:
        raise InvalidArgumentError(f"kind must be one of {sorted(_HOOKS)}; got {kind!r}.")
    return [_HOOKS[kind].format(layer) for layer in range(model.cfg.n_layers)]


@dataclass
class ActivationNorms(Result):
    """L2 norm of an activation per layer × position, and the norm's relative change from one
    layer to the next: change_rate[ℓ − 1] = (‖x_ℓ‖ − ‖x_{ℓ−1}‖) / ‖x_{ℓ−1}‖ (layers 1..L−1)."""

    units = {'norms': 'L2 norm (activation units)', 'change_rate': 'fraction (relative change)'}

    kind: str
    norms: Float[Tensor, "layer pos"]
    change_rate: Float[Tensor, "layer_minus_1 pos"]


@analysis_form('activation_norms(run_or_cache, *, kind="resid_post")', options=('kind',))
def activation_norms(cache: "ActivationCache", model: "TransformerBridge", kind: ActivationKind = "resid_post") -> ActivationNorms:
    """‖x‖₂ of `kind` ("resid_post", "attn_out", "mlp_out" or "mlp_post") at every layer and token."""
    norms = stacked(cache, activation_hook_names(model, kind)).float().norm(dim=-1)
    change = (norms[1:] - norms[:-1]) / norms[:-1].clamp_min(torch.finfo(norms.dtype).tiny)
    return ActivationNorms(kind, norms, change)


PERCENTILES = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)


def _percentiles(values: Float[Tensor, "row n"], levels: tuple[float, ...]) -> Float[Tensor, "row level"]:
    """Percentiles along the last dimension with linear interpolation (numpy's default);
    torch.quantile refuses inputs over 2**24 elements."""
    ranks = torch.tensor(levels, dtype=torch.float64, device=values.device) / 100.0 * (values.shape[-1] - 1)
    low, high = ranks.floor().long(), ranks.ceil().long()
    weight = ranks - low
    # The order statistics at those ranks by introselect (numpy.partition), not a full sort: the
    # same values at O(n) instead of O(n log n) (a sort of 12 M values per layer at 8,192 tokens).
    needed = sorted(set(low.tolist()) | set(high.tolist()))
    exact = values.detach().cpu()
    if exact.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; widening keeps the order
        exact = exact.float()
    selected = np.partition(exact.numpy(), needed, axis=-1)
    ordered = torch.from_numpy(selected[:, needed]).to(values.device).double()
    column = {rank: i for i, rank in enumerate(needed)}
    low_at = torch.tensor([column[r] for r in low.tolist()], device=values.device)
    high_at = torch.tensor([column[r] for r in high.tolist()], device=values.device)
    return ordered[:, low_at] * (1 - weight) + ordered[:, high_at] * weight


@dataclass
class ActivationStatistics(Result):
    """Distribution of an activation's values per layer, over every position and unit.
    `kurtosis` is the excess kurtosis (0 for a Gaussian); `percentiles[:, i]` is PERCENTILES[i]."""

    units = {'mean': 'activation units', 'std': 'activation units', 'percentiles': 'activation units', 'kurtosis': 'excess kurtosis (unitless)'}

    kind: str
    mean: Float[Tensor, " layer"]
    std: Float[Tensor, " layer"]
    percentiles: Float[Tensor, "layer percentile"]
    kurtosis: Float[Tensor, " layer"]
    percentile_levels: tuple[float, ...] = PERCENTILES


@analysis_form('activation_statistics(run_or_cache, *, kind="mlp_post")', options=('kind',))
def activation_statistics(
    cache: "ActivationCache", model: "TransformerBridge", kind: ActivationKind = "mlp_post"
) -> ActivationStatistics:
    """Mean, standard deviation (population), percentiles and excess kurtosis of `kind` per layer."""
    return ActivationStatistics(kind, *layer_statistics(stacked(cache, activation_hook_names(model, kind)).flatten(1)))


def layer_statistics(
    values: Float[Tensor, "layer n"],
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"], Float[Tensor, "layer percentile"], Float[Tensor, " layer"]]:
    """(mean, population std, PERCENTILES, excess kurtosis) of each row, computed in float64 and
    returned as float32 (one layer at a time by `mechvis.studies.longcontext`)."""
    percentiles = _percentiles(values, PERCENTILES)  # order statistics: the same in the input's dtype
    values = values.to(torch.float64, copy=True)  # a copy whatever the input's dtype: edited in place below
    mean = values.mean(-1)
    squares = values.sub_(mean[:, None]).square_()  # in place on the float64 copy: two fewer passes
    variance = squares.mean(-1)
    kurtosis = squares.square_().mean(-1) / variance.pow(2).clamp_min(1e-300) - 3.0
    return mean.float(), variance.sqrt().float(), percentiles.float(), kurtosis.float()
