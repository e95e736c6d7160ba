"""The model's own logits, although compatibility mode centres the unembedding.

`enable_compatibility_mode()` subtracts from W_U its mean over the vocabulary (and from b_U its
mean), which shifts every logit at a position by the same amount — the mean logit m(x) — and leaves
every log-probability unchanged. A bridge's logits are therefore logit − mean logit. To report
the logit the model itself computes (equal to the plain HF model's), `load_model` keeps, before
the weights are processed, the mean of the HF output embedding's rows w̄ (and of its bias b̄) and a
copy of the HF final norm with its original weights; then for a final residual r

    m(r) = s · (w̄ · norm(r) + b̄)

(s: a post-head logit scale — Cohere's `logit_scale`, 1 / Granite's `logits_scaling`), and the
model's own logit is the bridge's logit + m(r) − the bridge's own mean logit (≈ 0 once centred;
exactly what is left when transformer-lens did not centre, e.g. with logit soft-capping).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

ATTRIBUTE = "mechvis_unembedding_mean"


@dataclass
class UnembeddingMean:
    """What the centring removes, read from the HF model before weight processing."""

    weight: Float[Tensor, " d_model"]  # mean over the vocabulary of the output embedding's rows (float32)
    bias: float  # mean of the output embedding's bias (0 without one)
    final_norm: nn.Module | None  # the HF final norm with its original weights (float32), None if absent
    scale: float  # logits = scale · lm_head(norm(r))

    def mean_logit(self, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The HF model's mean logit over the vocabulary for final residual streams `residual`
        (before any soft-cap), in float32; differentiable in `residual`."""
        hidden = residual.float()
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        weight = self.weight.to(hidden.device)
        return self.scale * (hidden @ weight + self.bias)


def _logit_scale(config: object) -> float:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)  # Cohere: logits · logit_scale
    scaling = getattr(text_config, "logits_scaling", None)  # Granite: logits / logits_scaling
    return scale / float(scaling) if scaling else scale


def keep_unembedding_mean(bridge: "TransformerBridge") -> None:
    """Record on `bridge` what centring the unembedding will remove. Call before
    `enable_compatibility_mode()` (it processes the weights in place)."""
    head = bridge.original_model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return
    with torch.no_grad():
        weight = head.weight.detach().float().mean(0).clone()  # (vocab, d_model) rows → (d_model,)
        bias = float(head.bias.detach().float().mean()) if getattr(head, "bias", None) is not None else 0.0
    norm_bridge = getattr(bridge, "ln_final", None)
    norm = getattr(norm_bridge, "original_component", None) if norm_bridge is not None else None
    final_norm = copy.deepcopy(norm).float().eval().requires_grad_(False) if norm is not None else None
    setattr(bridge, ATTRIBUTE, UnembeddingMean(weight, bias, final_norm, _logit_scale(bridge.original_model.config)))


def centring_offset(model: "TransformerBridge", residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
    """What to add to the bridge's logits at final residual streams `residual` to get the model's
    own logits (float32, differentiable in `residual`): the HF model's mean logit minus the
    bridge's.

    Raises InvalidArgumentError for a bridge `mechvis.load_model` did not load (what centring
    removed is then unknown).
    """
    kept: UnembeddingMean | None = getattr(model, ATTRIBUTE, None)
    if kept is None:
        raise InvalidArgumentError(
            "This model was not loaded by mechvis.load_model, so the mean logit its centred unembedding "
            "removed is unknown. Load it with mechvis.load_model, or score the log-probability "
            "(score='logprob') or the centred logit (score='centered_logit')."
        )
    bridge_mean = model.unembed(model.ln_final(residual)).float().mean(-1)  # ≈ 0 when centred
    return kept.mean_logit(residual) - bridge_mean
