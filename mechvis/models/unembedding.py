"""The model's own logits, although compatibility mode centres the unembedding.

`enable_compatibility_mode()` folds the final norm into the unembedding and then subtracts from
W_U its mean over the vocabulary, a (d_model,), and from b_U its mean c. Every logit at a
position with unembedding input x (the bridge's `unembed.hook_in`) falls by the same x·a + c, so
log-probabilities are unchanged but a bridge's logits are logit − mean logit. `load_model` records
a and c as transformer-lens removes them (in the bridge's own basis, after every fold, so
prediction heads, logit scales and norm gains are accounted for); the model's own logit, equal to
the plain HF model's, is the bridge's logit + x·a + c. Where transformer-lens does not centre
(logit soft-capping, e.g. Gemma 2), a = 0 and c = 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.weight_processing import ProcessWeights

from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

ATTRIBUTE = "mechvis_unembedding_mean"
INPUT_HOOK = "unembed.hook_in"


@dataclass
class UnembeddingMean:
    """What centring removed from the bridge's unembedding (zeros if it was not centred)."""

    weight: Float[Tensor, " d_model"]  # a: W_U's mean over the vocabulary, float32
    bias: float  # c: b_U's mean

    def mean_logit(self, unembed_input: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """x·a + c for unembedding inputs x (float32, differentiable in x)."""
        return unembed_input.float() @ self.weight.to(unembed_input.device) + self.bias


@contextlib.contextmanager
def recording_unembedding_mean(bridge: "TransformerBridge") -> Iterator[None]:
    """Around `bridge.enable_compatibility_mode()`: record on the bridge what transformer-lens'
    `ProcessWeights.center_unembed` removes. If it never runs (no centring), nothing was removed,
    unless the unembedding ends up centred anyway (a transformer-lens that centres another way):
    then what was removed is unknown and `centring_offset` raises."""

    original = ProcessWeights.__dict__["center_unembed"]
    removed: dict[str, Tensor | float] = {}
    d_vocab = bridge.cfg.d_vocab

    def recording(state_dict, cfg=None, adapter=None):
        removed["called"] = True
        try:  # bookkeeping only: whatever happens here, the weights are processed as usual
            weight_key = ProcessWeights._get_param_key("unembed.W_U", adapter)
            bias_key = ProcessWeights._get_param_key("unembed.b_U", adapter)
            # transformer-lens' centring works on a copy, so the float32 input stays as it is: no
            # clone of the unembedding (113 MB at the peak of loading) unless a cast made a new one.
            weight = state_dict[weight_key].detach()
            before_weight = weight.float()
            version = weight._version
            before_bias = state_dict[bias_key].detach().float().clone() if bias_key in state_dict else None
        except Exception:  # noqa: BLE001 - an unexpected state dict: what was removed stays unknown
            return original.__func__(state_dict, cfg=cfg, adapter=adapter)
        processed = _center_unembedding_only(original.__func__, state_dict, (weight_key, bias_key), cfg, adapter)
        try:
            if weight._version != version:  # written into after all: what was removed is unknown
                raise RuntimeError("the unembedding was centred in place")
            difference = before_weight - processed[weight_key].detach().float()  # constant along the vocabulary
            vocab_dim = 0 if difference.shape[0] == d_vocab and difference.shape[-1] != d_vocab else -1
            removed["weight"] = difference.mean(vocab_dim)
            removed["bias"] = float((before_bias - processed[bias_key].detach().float()).mean()) if before_bias is not None else 0.0
        except Exception:  # noqa: BLE001
            removed.pop("weight", None)
        return processed

    ProcessWeights.center_unembed = staticmethod(recording)
    try:
        yield
    finally:
        ProcessWeights.center_unembed = original
    d_model = bridge.cfg.d_model
    if "weight" in removed and removed["weight"].shape == (d_model,):
        kept = UnembeddingMean(removed["weight"], float(removed["bias"]))
    elif removed.get("called"):
        kept = None  # centred, but what it removed could not be read
    else:  # not centred (soft-capping) — unless a transformer-lens that centres some other way
        weight = bridge.W_U.detach().float()
        centred = bool(weight.mean(-1).abs().max() <= 1e-6 * weight.abs().max())
        kept = None if centred else UnembeddingMean(torch.zeros(d_model), 0.0)
    setattr(bridge, ATTRIBUTE, kept)


def _center_unembedding_only(center_unembed, state_dict: dict, keys: tuple[str, str], cfg, adapter) -> dict:
    """transformer-lens' `center_unembed` applied to the unembedding's weight and bias alone, the
    rest of `state_dict` passed through as it is. The function clones every tensor of the dict it
    gets (a whole model's weights, at the peak of loading) and changes only these two; given just
    them it computes the same values. Any failure on the reduced dict (a transformer-lens whose
    centring reads other entries) falls back to the whole dict."""
    reduced = {key: state_dict[key] for key in keys if key in state_dict}
    try:
        centred = center_unembed(reduced, cfg=cfg, adapter=adapter)
    except Exception:  # noqa: BLE001 - same weights, the original call
        return center_unembed(state_dict, cfg=cfg, adapter=adapter)
    if set(centred) != set(reduced):  # it added or dropped entries: only the whole dict is safe
        return center_unembed(state_dict, cfg=cfg, adapter=adapter)
    return {**state_dict, **centred}


def centring_offset(model: "TransformerBridge", unembed_input: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
    """What to add to the bridge's logits at unembedding inputs `unembed_input` (a run's
    `cache["unembed.hook_in"]`) to get the model's own logits: x·a + c, float32, differentiable
    in x. (Before any logit soft-cap; transformer-lens never centres a soft-capped model, so the
    offset is then 0.)

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
    return kept.mean_logit(unembed_input)
