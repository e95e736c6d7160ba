"""Residual-stream contributions: decomposition into embeddings, attention heads and MLPs, direct
logit attribution (DLA) and layer-to-layer similarity of the residual stream.

DLA scales every component by the final norm's *cached* scale at the position, so the parts add up
exactly to the logit (difference) — the opposite choice from the logit lens, which recomputes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._validation import activation, analysis_form, check_bool, check_layers, check_positions, stacked
from mechvis.results import Result
from mechvis.text import single_token_id

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


@analysis_form('head_results(run_or_cache, *, layer)', options=('layer',))
def head_results(cache: "ActivationCache", model: "TransformerBridge", layer: int) -> Float[Tensor, "head pos d_model"]:
    """Each attention head's write to the residual stream at `layer` (without the output bias).

    Heads plus `b_O` sum to the layer's attention output. Computed in float32 (whatever the
    model's dtype). For models that normalise the attention
    output (Gemma 2/3 `ln1_post`), each head is scaled by that norm's cached scale, the same
    linearisation DLA uses for the final norm, so the sum still equals the attention output.
    """
    (layer,) = check_layers(model, [layer])
    attention = model.blocks[layer].attn
    z = activation(cache, f"blocks.{layer}.attn.hook_z")
    weight = attention.W_O.detach()
    # float32 whatever the model's dtype: a half-precision sum over d_head loses digits DLA keeps.
    results = einops.einsum(z.float(), weight.float(), "pos head d_head, head d_head d_model -> head pos d_model")
    post_norm = getattr(model.blocks[layer], "ln1_post", None)
    if post_norm is not None:
        # An RMSNorm output times its input's RMS is g ⊙ x: the norm's gain, applied linearly.
        with torch.no_grad():
            rms = (results.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
            gained = post_norm(results.to(weight.dtype)).float() * rms  # the module in its own dtype
        results = gained / activation(cache, f"blocks.{layer}.ln1_post.hook_scale").float()
    return results


def _attention_bias(model: "TransformerBridge", layer: int, like: Tensor) -> Tensor:
    bias = model.blocks[layer].attn.b_O
    return torch.zeros_like(like) if bias is None else bias.detach().float().expand_as(like)


@dataclass
class ResidualDecomposition(Result):
    """Parts of the residual stream entering `upto_layer` (the final stream when it equals
    n_layers): they sum to it exactly (in float32, whatever the model's dtype). Labels: "embed", "pos_embed", "L{i}.attn" (or per head
    "L{i}H{h}" plus "L{i}.attn_bias"), "L{i}.mlp"."""

    label_fields = {"component": ("labels",)}  # embeddings, attention/MLP outputs of each layer, biases
    units = {'components': 'residual-stream units (float32)'}

    labels: list[str]
    components: Float[Tensor, "component pos d_model"]
    upto_layer: int


@analysis_form('decompose_residual(run_or_cache, *, upto_layer=None, heads=False)')
def decompose_residual(
    cache: "ActivationCache", model: "TransformerBridge", *, upto_layer: int | None = None, heads: bool = False
) -> ResidualDecomposition:
    """Decompose the residual stream entering block `upto_layer` (None: the final stream).

    Raises:
        InvalidArgumentError: a bad `upto_layer`, `heads` not a bool.
        MissingActivationsError: a cache without the hooks the decomposition reads."""
    heads = check_bool(heads, "heads")
    n_layers = model.cfg.n_layers
    upto = n_layers if upto_layer is None else check_layers(model, [upto_layer])[0]
    embed = activation(cache, "hook_embed").float()
    labels, parts = ["embed"], [embed]
    if "hook_pos_embed" in cache and cache["hook_pos_embed"].shape == cache["hook_embed"].shape:
        labels.append("pos_embed")
        parts.append(activation(cache, "hook_pos_embed").float())
    for layer in range(upto):
        if heads:
            per_head = head_results.__wrapped__(cache, model, layer)
            labels += [f"L{layer}H{head}" for head in range(per_head.shape[0])] + [f"L{layer}.attn_bias"]
            parts += [*per_head, _attention_bias(model, layer, embed)]
        else:
            labels.append(f"L{layer}.attn")
            parts.append(activation(cache, f"blocks.{layer}.hook_attn_out").float())
        labels.append(f"L{layer}.mlp")
        parts.append(activation(cache, f"blocks.{layer}.hook_mlp_out").float())
    return ResidualDecomposition(labels, torch.stack(parts), upto)


@dataclass
class LogitAttribution(Result):
    """Direct logit attribution at one position: each component's contribution to
    logit(answer) − logit(counterfactual) (`value_kind` "logit_difference", the same as the plain
    HF model's), or to the answer's *centred* logit alone (`value_kind` "centered_logit":
    logit − mean logit over the vocabulary; compatibility mode centres the unembedding, so a
    component that raises every logit alike contributes nothing), in logits.

    `contributions` plus `unembed_bias` sum to `model_value` (before any logit soft-cap).
    """

    label_fields = {"component": ("labels",)}
    units = {'contributions': "logit (the model's own) difference, or centred logit: see value_kind", 'unembed_bias': 'logit', 'model_value': "logit (the model's own) difference, or centred logit: see value_kind"}

    labels: list[str]
    contributions: Float[Tensor, " component"]
    unembed_bias: float
    model_value: float
    position: int
    answer_id: int
    counterfactual_id: int | None
    value_kind: str = "logit_difference"  # or "centered_logit" without a counterfactual

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The `n` components with the largest absolute contribution, largest first."""
        order = self.contributions.abs().argsort(descending=True)[:n]
        return [(self.labels[i], self.contributions[i].item()) for i in order.tolist()]


@analysis_form('direct_logit_attribution(run_or_cache, *, answer, counterfactual=None, position=-1, heads=True)', options=('answer', 'counterfactual'))
def direct_logit_attribution(
    cache: "ActivationCache",
    model: "TransformerBridge",
    answer: int | str,
    counterfactual: int | str | None = None,
    *,
    position: int = -1,
    heads: bool = True,
) -> LogitAttribution:
    """Attribute the logit of `answer` minus that of `counterfactual` at `position` (or, with no
    counterfactual, the answer's centred logit: see LogitAttribution) to the embeddings, each
    attention head (or layer) and each MLP, through the final norm's cached scale."""
    decomposition = decompose_residual.__wrapped__(cache, model, heads=heads)
    (position,) = check_positions(decomposition.components.shape[1], [position])
    answer_id = single_token_id(model, answer)
    counterfactual_id = None if counterfactual is None else single_token_id(model, counterfactual)
    direction = model.W_U[:, answer_id].detach().float()  # float32 whatever the model's dtype
    bias = model.b_U[answer_id].item() if model.b_U is not None else 0.0
    if counterfactual_id is not None:
        direction = direction - model.W_U[:, counterfactual_id].detach().float()
        bias -= model.b_U[counterfactual_id].item() if model.b_U is not None else 0.0
    scale = activation(cache, "ln_final.hook_scale")[position].float()  # (1,): the cached final-norm scale
    contributions = decomposition.components[:, position] / scale @ direction
    final = activation(cache, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")[position]
    with torch.no_grad():
        logits = model.unembed(model.ln_final(final))
    value = logits[answer_id] - (logits[counterfactual_id] if counterfactual_id is not None else 0.0)
    return LogitAttribution(
        labels=decomposition.labels,
        contributions=contributions,
        unembed_bias=bias,
        model_value=float(value),
        position=position,
        answer_id=answer_id,
        counterfactual_id=counterfactual_id,
        value_kind="centered_logit" if counterfactual_id is None else "logit_difference",
    )


@dataclass
class LayerSimilarity(Result):
    """Cosine similarity between the residual streams after each layer, averaged over positions.

    Rows and columns are "embed", "0", ..., str(n_layers − 1).
    """

    units = {'cosine': 'cosine similarity'}

    layer_labels: list[str]
    cosine: Float[Tensor, "layer layer"]
    positions: list[int]


@analysis_form('layer_similarity(run_or_cache, *, positions=None)')
def layer_similarity(
    cache: "ActivationCache", model: "TransformerBridge", *, positions: Sequence[int] | None = None
) -> LayerSimilarity:
    """Mean over `positions` (default: all but the first, an attention sink with outsized norms)
    of cos(resid_i, resid_j) for every pair of layers."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    residual = stacked(cache, names).float()
    n_positions = residual.shape[1]
    chosen = check_positions(n_positions, positions if positions is not None else range(min(1, n_positions - 1), n_positions))
    unit = torch.nn.functional.normalize(residual[:, chosen], dim=-1)
    cosine = einops.einsum(unit, unit, "i pos d, j pos d -> i j") / len(chosen)
    return LayerSimilarity(["embed"] + [str(i) for i in range(model.cfg.n_layers)], cosine, chosen)
