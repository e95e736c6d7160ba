"""Input attribution of one logit to each input token: gradient × input and occlusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechvis.analysis._checks import check_positions, single_token_id
from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class InputAttribution:
    """How much each input token contributes to `logit(target)` at `position`, in logits."""

    method: str
    scores: Float[Tensor, " pos"]
    target_id: int
    position: int
    target_logit: float


def _checked_tokens(tokens: Int[Tensor, " pos"]) -> Int[Tensor, " pos"]:
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise InvalidArgumentError(f"tokens must be one non-empty sequence (pos,); got shape {tuple(tokens.shape)}.")
    return tokens


def gradient_x_input(
    model: "TransformerBridge", tokens: Int[Tensor, " pos"], target: int | str, *, position: int = -1
) -> InputAttribution:
    """Σ_d ∂logit(target)/∂e_{t,d} · e_{t,d} for each token embedding e_t (first-order Taylor
    estimate of removing the token's embedding). Model parameters get no gradients."""
    tokens = _checked_tokens(tokens)
    (position,) = check_positions(tokens.shape[0], [position])
    target_id = single_token_id(model, target)
    leaf: dict[str, Tensor] = {}

    def as_leaf(embedding: Tensor, hook: object) -> Tensor:
        leaf["embedding"] = embedding.detach().requires_grad_(True)
        return leaf["embedding"]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None].to(model.cfg.device), fwd_hooks=[("hook_embed", as_leaf)])
        target_logit = logits[0, position, target_id]
        (gradient,) = torch.autograd.grad(target_logit, leaf["embedding"])
    scores = (gradient[0].float() * leaf["embedding"][0].detach().float()).sum(-1)
    return InputAttribution("gradient_x_input", scores, target_id, position, target_logit.item())


def occlusion(
    model: "TransformerBridge",
    tokens: Int[Tensor, " pos"],
    target: int | str,
    *,
    position: int = -1,
    batch_size: int = 16,
) -> InputAttribution:
    """logit(target) − logit(target with token t's embedding set to zero), for each t.

    Runs len(tokens) occluded copies in batches of `batch_size`. Tokens after `position` score
    exactly 0 under a causal mask.
    """
    tokens = _checked_tokens(tokens).to(model.cfg.device)
    n_positions = tokens.shape[0]
    (position,) = check_positions(n_positions, [position])
    target_id = single_token_id(model, target)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1; got {batch_size}.")
    with torch.no_grad():
        clean = model(tokens[None])[0, position, target_id].item()
        occluded = torch.empty(n_positions)
        starts = range(0, n_positions, batch_size)
        for start in tqdm(starts, desc="occlusion", disable=len(starts) < 4, leave=False):
            hidden = torch.arange(start, min(start + batch_size, n_positions), device=tokens.device)

            def zero_one_position(embedding: Tensor, hook: object, hidden: Tensor = hidden) -> Tensor:
                embedding = embedding.clone()
                embedding[torch.arange(hidden.shape[0]), hidden] = 0.0
                return embedding

            batch = tokens[None].expand(hidden.shape[0], -1)
            logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", zero_one_position)])
            occluded[start : start + hidden.shape[0]] = logits[:, position, target_id].cpu()
    return InputAttribution("occlusion", clean - occluded, target_id, position, clean)
