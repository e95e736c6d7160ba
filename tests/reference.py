"""Independent reference computations: plain HF forwards and numpy written from the formulas.
Nothing here calls mechvis."""

from __future__ import annotations

import numpy as np
import torch


def hf_forward(reference, token_ids):
    with torch.no_grad():
        return reference(torch.as_tensor(token_ids)[None], output_hidden_states=True, output_attentions=True)


def hf_lens_log_probs(reference, token_ids) -> np.ndarray:
    """(layer, pos, vocab) log-probs: HF hidden states through the final norm and lm_head by hand.

    HF's last hidden state is already normalised, so the last row is the model's own logits.
    """
    output = hf_forward(reference, token_ids)
    base = reference.base_model
    final_norm = getattr(base, "norm", None) or base.ln_f
    cap = getattr(reference.config, "final_logit_softcapping", None)
    rows = []
    with torch.no_grad():
        for hidden in output.hidden_states[:-1]:
            logits = reference.lm_head(final_norm(hidden))
            if cap:
                logits = cap * torch.tanh(logits / cap)
            rows.append(logits[0])
    rows.append(output.logits[0])
    return torch.stack(rows).double().log_softmax(-1).numpy()


def hf_attentions(reference, token_ids) -> np.ndarray:
    """(layer, head, query, key) attention probabilities from HF with output_attentions."""
    return torch.stack(hf_forward(reference, token_ids).attentions)[:, 0].double().numpy()


def entropy_rows(pattern: np.ndarray) -> np.ndarray:
    """−Σ a ln a over the last axis, one row at a time, 0 ln 0 = 0."""
    out = np.zeros(pattern.shape[:-1])
    for index in np.ndindex(*pattern.shape[:-1]):
        row = pattern[index]
        nonzero = row[row > 0]
        out[index] = -(nonzero * np.log(nonzero)).sum()
    return out


def rollout_loop(attentions: np.ndarray, residual_weight: float = 0.5) -> np.ndarray:
    """Abnar & Zuidema rollout, written plainly: mean over heads, add identity, normalise rows,
    multiply layer after layer."""
    n = attentions.shape[-1]
    result = np.eye(n)
    for layer in attentions:
        mixed = (1 - residual_weight) * layer.mean(axis=0) + residual_weight * np.eye(n)
        for i in range(n):
            mixed[i] = mixed[i] / mixed[i].sum()
        result = mixed @ result
    return result
