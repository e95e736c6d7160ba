"""Input attribution of a target token's score to each input token: gradient × input and occlusion.

The score is, by `score=`:
- "logit" (default): the model's own logit of the target, equal to the plain HF model's;
- "logprob": its log-probability (nats), log softmax of the logits;
- "centered_logit": logit − mean logit over the vocabulary, what a compatibility-mode bridge
  outputs (transformer-lens centres the unembedding, except under logit soft-capping, where this
  is computed from the logits; `mechvis.models.unembedding`).
The three differ: the mean logit moves when a token is occluded or its embedding changes, so
attributions of a logit and of a centred logit rank tokens differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechvis._validation import check_integer, check_positions, check_token_ids
from mechvis.errors import InvalidArgumentError
from mechvis.models.unembedding import INPUT_HOOK, centring_offset
from mechvis.results import Result
from mechvis.text import single_token_id

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Score = Literal["logit", "logprob", "centered_logit"]
SCORES: tuple[str, ...] = ("logit", "logprob", "centered_logit")


@dataclass
class InputAttribution(Result):
    """How much each input token contributes to the target's `score` at `position`: in logits for
    "logit" and "centered_logit", in nats for "logprob". `target_value` is that score on the
    unchanged input."""

    units = {'scores': "logit (the model's own), centred logit or nats: see score", 'target_value': "logit (the model's own), centred logit or nats: see score"}

    method: str
    scores: Float[Tensor, " pos"]
    target_id: int
    position: int
    target_value: float
    score: str = "logit"  # "logit", "logprob" or "centered_logit"


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise InvalidArgumentError(f"score must be one of {SCORES}; got {score!r}.")


def _target_scores(
    logits: Float[Tensor, "batch vocab"], offset: Float[Tensor, " batch"] | None, target_id: int, score: str
) -> Float[Tensor, " batch"]:
    """The target's score from the bridge's logits at one position (float32, differentiable);
    `offset` is what centring removed there (`centring_offset`), needed for "logit"."""
    logits = logits.float()
    if score == "logprob":
        return logits.log_softmax(-1)[:, target_id]
    if score == "centered_logit":  # ≈ the bridge's logit once centred; exact if it was not (soft-capping)
        return logits[:, target_id] - logits.mean(-1)
    return logits[:, target_id] + offset


def _offset_hook(model: "TransformerBridge", position: int, store: dict, score: str) -> list[tuple[str, object]]:
    """A hook keeping `centring_offset` at `position` from the unembedding's input (for "logit")."""
    if score != "logit":
        return []
    centring_offset(model, torch.zeros(model.cfg.d_model))  # raises now, not inside the forward, if unknown

    def keep(unembed_input: Tensor, hook: object) -> None:
        store["offset"] = centring_offset(model, unembed_input[:, position])

    return [(INPUT_HOOK, keep)]


def gradient_x_input(
    model: "TransformerBridge", tokens: Int[Tensor, " pos"], target: int | str, *, position: int = -1, score: Score = "logit"
) -> InputAttribution:
    """Σ_d ∂score/∂e_{t,d} · e_{t,d} for each token embedding e_t (first-order Taylor estimate
    of removing the token's embedding; Shrikumar et al. 2016, Captum's InputXGradient), with
    score the target's logit, log-probability or centred logit at `position` (module docstring).
    Model parameters get no gradients.

    Raises InvalidArgumentError for a bad score, position, a target that is not one token, or
    tokens that are not one non-empty sequence of ids in the vocabulary (a list is converted).
    """
    tokens = check_token_ids(model, tokens)
    _check_score(score)
    (position,) = check_positions(tokens.shape[0], [position])
    target_id = single_token_id(model, target)
    leaf: dict[str, Tensor] = {}

    def as_leaf(embedding: Tensor, hook: object) -> Tensor:
        leaf["embedding"] = embedding.detach().requires_grad_(True)
        return leaf["embedding"]

    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens[None].to(model.cfg.device), fwd_hooks=[("hook_embed", as_leaf), *_offset_hook(model, position, leaf, score)]
        )
        value = _target_scores(logits[:, position], leaf.get("offset"), target_id, score)[0]
        (gradient,) = torch.autograd.grad(value, leaf["embedding"])
    scores = (gradient[0].float() * leaf["embedding"][0].detach().float()).sum(-1)
    return InputAttribution("gradient_x_input", scores, target_id, position, value.item(), score)


def occlusion(
    model: "TransformerBridge",
    tokens: Int[Tensor, " pos"],
    target: int | str,
    *,
    position: int = -1,
    batch_size: int = 16,
    score: Score = "logit",
) -> InputAttribution:
    """score(target) − score(target with token t's embedding set to zero), for each t (Zeiler &
    Fergus 2014; Captum's Occlusion with a one-token window and a zero baseline), with score the
    target's logit, log-probability or centred logit at `position` (module docstring).
    Runs one occluded copy per token up to `position` in batches of `batch_size`; tokens after
    it score exactly 0 under a causal mask (they are not run; a bidirectional model runs them all).

    Raises InvalidArgumentError for a bad score, position, batch size, a target that is not one
    token, or tokens that are not one non-empty sequence of ids in the vocabulary.
    """
    batch_size = check_integer(batch_size, "batch_size", low=1)
    tokens = check_token_ids(model, tokens).to(model.cfg.device)
    _check_score(score)
    n_positions = tokens.shape[0]
    (position,) = check_positions(n_positions, [position])
    target_id = single_token_id(model, target)
    store: dict[str, Tensor] = {}
    keep_offset = _offset_hook(model, position, store, score)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=keep_offset)
        clean = _target_scores(logits[:, position], store.get("offset"), target_id, score)[0].item()
        occluded = torch.full((n_positions,), clean)
        causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
        n_run = position + 1 if causal else n_positions  # later tokens cannot reach `position`
        starts = range(0, n_run, batch_size)
        for start in tqdm(starts, desc="occlusion", disable=len(starts) < 4, leave=False):
            hidden = torch.arange(start, min(start + batch_size, n_run), device=tokens.device)

            def zero_one_position(embedding: Tensor, hook: object, hidden: Tensor = hidden) -> Tensor:
                embedding = embedding.clone()
                embedding[torch.arange(hidden.shape[0]), hidden] = 0.0
                return embedding

            batch = tokens[None].expand(hidden.shape[0], -1)
            logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", zero_one_position), *keep_offset])
            values = _target_scores(logits[:, position], store.get("offset"), target_id, score)
            occluded[start : start + hidden.shape[0]] = values.cpu()
    return InputAttribution("occlusion", clean - occluded, target_id, position, clean, score)
