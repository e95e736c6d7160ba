"""Logit lens (nostalgebraist 2020): decode every layer's residual stream with the final norm and
unembedding. The final norm's scale is recomputed for each layer's residual (TransformerLens bug
#1076 used the final layer's cached scale for all layers: ranks survive that, probabilities do not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis.analysis._checks import activation, check_positions, single_token_id
from mechvis.running import vocabulary_strings

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


_BLOCK_ELEMENTS = 1 << 18  # float64 numbers per row block: 2 MB, small enough to stay in cache


def unembed_logits(model: "TransformerBridge", residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits the model would output if `residual` were its final residual stream: the final
    norm recomputed on `residual`, the unembedding, and the model's logit soft-cap if any."""
    with torch.no_grad():
        logits = model.unembed(model.ln_final(residual))
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def lens_hook_names(model: "TransformerBridge", include_resid_mid: bool = False) -> list[str]:
    """Residual-stream hooks the lens reads, in layer order: embeddings, then each block."""
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(model.cfg.n_layers):
        if include_resid_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
        names.append(f"blocks.{layer}.hook_resid_post")
    return names


def _layer_label(hook_name: str) -> str:
    if hook_name == "blocks.0.hook_resid_pre":
        return "embed"
    layer = hook_name.split(".")[1]
    return f"{layer}.mid" if hook_name.endswith("resid_mid") else layer


@dataclass
class LogitLens:
    """The logit lens over layers × positions. Probabilities are in [0, 1]; entropies and KL in nats.

    Rows are `layer_labels`: "embed" (the token embeddings), then "0", "1", ... (each block's
    output, resid_post) with "i.mid" (after block i's attention) when requested. The last row is
    the model's own output distribution.
    """

    layer_labels: list[str]
    positions: list[int]
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_tokens: list[list[list[str]]]  # [layer][pos][k]
    target_ids: Int[Tensor, " pos"]
    target_probs: Float[Tensor, "layer pos"]
    target_ranks: Int[Tensor, "layer pos"]  # 0 = the layer's top token
    entropy: Float[Tensor, "layer pos"]  # nats
    kl_from_final: Float[Tensor, "layer pos"]  # KL(p_final ‖ p_layer), nats
    max_probs: Float[Tensor, "layer pos"]

    @property
    def confidence(self) -> Float[Tensor, " layer"]:
        """Mean over positions of the top-1 probability ("confidence across layers")."""
        return self.max_probs.mean(dim=1)


def logit_lens(
    cache: "ActivationCache",
    model: "TransformerBridge",
    *,
    positions: Sequence[int] | None = None,
    target: int | str | None = None,
    k: int = 5,
    include_resid_mid: bool = False,
) -> LogitLens:
    """Decode each layer's residual stream at `positions` (default: all).

    Args:
        target: a token (id, or a string that is one token) whose probability and rank are
            tracked at every position; None tracks each position's final top-1 token.
        k: how many top tokens to keep per layer and position.
    """
    names = lens_hook_names(model, include_resid_mid)
    first = activation(cache, names[0])
    chosen = check_positions(first.shape[0], positions)
    index = torch.tensor(chosen, device=first.device)
    # In float64 (KL at early layers reaches ~100 nats, where float32 loses the fourth decimal),
    # one layer at a time (layers × positions × vocab would not fit for long inputs), and within a
    # layer in blocks of rows small enough that every pass after the matmul runs in cache: over a
    # whole (pos, vocab) float64 array each pass would stream it from memory.
    final_logits = unembed_logits(model, activation(cache, names[-1])[index])
    rows_per_block = max(1, _BLOCK_ELEMENTS // final_logits.shape[-1])
    final_blocks = [block.double().log_softmax(-1) for block in final_logits.split(rows_per_block)]
    del final_logits
    if target is None:
        target_ids = torch.cat([block.argmax(-1) for block in final_blocks])
    else:
        target_ids = torch.full((len(chosen),), single_token_id(model, target), device=first.device)
    final_blocks = [(log_probs.exp(), log_probs) for log_probs in final_blocks]
    # Σ p_final ln p_final per row; KL(p_final ‖ p_layer) = that − Σ p_final ln p_layer
    final_terms = [(probs * log_probs).sum(-1) for probs, log_probs in final_blocks]
    final_probs_blocks = [probs for probs, _ in final_blocks]
    del final_blocks
    target_blocks = target_ids.split(rows_per_block)

    rows: dict[str, list[Tensor]] = {key: [] for key in ("top_p", "top_i", "tp", "tr", "h", "kl", "mx")}
    for name in names:
        logits = unembed_logits(model, activation(cache, name)[index])
        parts: dict[str, list[Tensor]] = {key: [] for key in rows}
        for block, block_targets, final_probs, final_term in zip(
            logits.split(rows_per_block), target_blocks, final_probs_blocks, final_terms
        ):
            log_probs = block.double().log_softmax(-1)
            probs = log_probs.exp()
            top_probs, top_ids = probs.topk(k, dim=-1)
            target_log_probs = log_probs.gather(-1, block_targets[:, None])[:, 0]
            parts["top_p"].append(top_probs)
            parts["top_i"].append(top_ids)
            parts["tp"].append(target_log_probs.exp())
            parts["tr"].append((log_probs > target_log_probs[:, None]).sum(-1))
            parts["h"].append(-(probs.mul_(log_probs)).sum(-1))
            parts["kl"].append(final_term - (log_probs.mul_(final_probs)).sum(-1))
            parts["mx"].append(top_probs[:, 0])
        del logits
        for key, values in parts.items():
            rows[key].append(torch.cat(values))
    top_ids = torch.stack(rows["top_i"])
    vocabulary_strings = decode_nested(model, top_ids)
    return LogitLens(
        layer_labels=[_layer_label(name) for name in names],
        positions=chosen,
        top_ids=top_ids,
        top_probs=torch.stack(rows["top_p"]).float(),
        top_tokens=vocabulary_strings,
        target_ids=target_ids,
        target_probs=torch.stack(rows["tp"]).float(),
        target_ranks=torch.stack(rows["tr"]),
        entropy=torch.stack(rows["h"]).float(),
        kl_from_final=torch.stack(rows["kl"]).clamp_min(0.0).float(),
        max_probs=torch.stack(rows["mx"]).float(),
    )


def decode_nested(model: "TransformerBridge", ids: Int[Tensor, "*shape"]) -> list:
    """Each id decoded on its own, as nested lists of the tensor's shape."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    strings = vocabulary_strings(model, unique.tolist())
    return _nest([strings[i] for i in inverse.flatten().tolist()], list(ids.shape))


def _nest(flat: list, shape: list[int]) -> list:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
