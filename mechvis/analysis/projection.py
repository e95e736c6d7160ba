"""PCA projection of token embeddings or hidden states to 2 or 3 dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._validation import activation, analysis_form, check_integer, check_layers, check_positions, check_tensor, shown
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.text import single_token_id, vocabulary_strings

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class Projection(Result):
    """Points projected on their top principal components.

    Each component's sign is fixed so that its largest-magnitude loading is positive.
    """

    label_fields = {"point": ("labels",)}  # the points' names; components are numbered
    units = {'coordinates': 'residual-stream units (along each component)', 'explained_variance_ratio': 'fraction', 'components': 'unit vector', 'mean': 'residual-stream units'}

    coordinates: Float[Tensor, "point component"]
    explained_variance_ratio: Float[Tensor, " component"]
    components: Float[Tensor, "component d_model"]
    mean: Float[Tensor, " d_model"]
    labels: list[str]


def pca(vectors: Float[Tensor, "point d_model"], labels: Sequence[str], *, n_components: int = 2) -> Projection:
    """Project `vectors` on their first `n_components` principal components.

    Raises:
        InvalidArgumentError: vectors that are not a finite (points, dim) float tensor (a numpy
            array is converted), not one label per point, n_components not an integer in
            1..min(points, dim).
    """
    vectors = check_tensor(vectors, "vectors", ndim=2, shape="(points, dim)")
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or vectors.shape[0] != len(labels):
        raise InvalidArgumentError(
            f"Need one label per point: {vectors.shape[0]} points; got labels {shown(labels, 60)}."
        )
    n_components = check_integer(n_components, "n_components", low=1, high=min(vectors.shape))
    if not bool(torch.isfinite(vectors).all()):
        bad = int((~torch.isfinite(vectors)).any(-1).nonzero()[0, 0])
        raise InvalidArgumentError(f"vectors hold NaN or infinite values (first at point {bad}, {labels[bad]!r}); PCA needs finite numbers.")
    data = vectors.double()
    mean = data.mean(0)
    _, singular_values, right = torch.linalg.svd(data - mean, full_matrices=False)
    components = right[:n_components]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    components = components * signs
    variance = singular_values.pow(2)
    return Projection(
        coordinates=((data - mean) @ components.T).float(),
        explained_variance_ratio=(variance[:n_components] / variance.sum()).float(),
        components=components.float(),
        mean=mean.float(),
        labels=list(labels),
    )


@analysis_form('hidden_state_projection(run_or_cache, *, labels, layer=None, positions=None, n_components=2)', options=('labels',))
def hidden_state_projection(
    cache: "ActivationCache",
    model: "TransformerBridge",
    labels: Sequence[str],
    *,
    layer: int | None = None,
    positions: Sequence[int] | None = None,
    n_components: int = 2,
) -> Projection:
    """PCA of the residual stream after `layer` (None: the token embeddings) at `positions`;
    `labels` names every position of the sequence (e.g. `run.str_tokens`)."""
    name = "blocks.0.hook_resid_pre" if layer is None else f"blocks.{check_layers(model, [layer])[0]}.hook_resid_post"
    states = activation(cache, name)
    chosen = check_positions(states.shape[0], positions)
    if len(labels) != states.shape[0]:
        raise InvalidArgumentError(f"labels has {len(labels)} entries; the sequence has {states.shape[0]} positions.")
    return pca(states[chosen], [labels[p] for p in chosen], n_components=n_components)


def embedding_projection(model: "TransformerBridge", tokens: Sequence[int | str], *, n_components: int = 2) -> Projection:
    """PCA of rows of the embedding matrix for `tokens` (ids, or strings that are one token each).

    Raises:
        InvalidArgumentError: tokens not a list, fewer tokens than n_components, a token that is
            not one id in the vocabulary or a one-token string.
    """
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, Tensor)) or len(tokens) == 0:
        raise InvalidArgumentError(
            f"tokens must be a non-empty list of token ids or one-token strings (e.g. [' Paris', ' London']); got {shown(tokens)}."
        )
    ids = [single_token_id(model, token) for token in tokens]
    vectors = model.W_E[torch.tensor(ids, device=model.W_E.device)].detach()
    return pca(vectors, vocabulary_strings(model, ids), n_components=n_components)
