"""mechvis's metric implementations as they were before issue 18's speed-ups (logit lens, token
signals, head entropy's visible-key tiles), kept verbatim apart from names and imports, so tests can check that the faster versions
compute the same numbers on the same inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis._validation import activation, check_positions
from mechvis.analysis.lens import LogitLens, _layer_label, decode_nested, lens_hook_names, unembed_logits
from mechvis.analysis.tokens import TokenSignals
from mechvis.errors import InvalidArgumentError
from mechvis.models.architecture import LayerAttention
from mechvis.text import single_token_id


def logit_lens(
    cache: object,
    model: object,
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
    final_log_probs = unembed_logits(model, activation(cache, names[-1])[index]).double().log_softmax(-1)
    final_probs = final_log_probs.exp()
    if target is None:
        target_ids = final_log_probs.argmax(-1)
    else:
        target_ids = torch.full((len(chosen),), single_token_id(model, target), device=first.device)

    rows: dict[str, list[Tensor]] = {key: [] for key in ("top_p", "top_i", "tp", "tr", "h", "kl", "mx")}
    # One layer at a time (layers × positions × vocab would not fit for long inputs), in float64:
    # KL at early layers reaches ~100 nats, where float32 loses the fourth decimal.
    for name in names:
        log_probs = unembed_logits(model, activation(cache, name)[index]).double().log_softmax(-1)
        probs = log_probs.exp()
        top_probs, top_ids = probs.topk(k, dim=-1)
        target_log_probs = log_probs.gather(-1, target_ids[:, None])[:, 0]
        rows["top_p"].append(top_probs)
        rows["top_i"].append(top_ids)
        rows["tp"].append(target_log_probs.exp())
        rows["tr"].append((log_probs > target_log_probs[:, None]).sum(-1))
        rows["h"].append(-(probs * log_probs).sum(-1))
        rows["kl"].append((final_probs * (final_log_probs - log_probs)).sum(-1))
        rows["mx"].append(top_probs[:, 0])
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



_BLOCK_ELEMENTS = 1 << 18  # logits per row block: 1 MB of float32, small enough to stay in cache


def block_signals(
    logits: Float[Tensor, "rows vocab"], next_ids: Int[Tensor, " rows"], k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    varentropy = (probs * (log_probs + entropy[:, None]).square()).sum(-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    surprisal = -log_probs.gather(-1, next_ids[:, None])[:, 0]
    return entropy, varentropy, top_probs, top_ids, surprisal


def token_signals(
    logits: Float[Tensor, "pos vocab"], tokens: Int[Tensor, " pos"] | None = None, *, k: int = 5
) -> TokenSignals:
    """Signals of each position's next-token distribution; `tokens` (the sequence) gives surprisal."""
    if logits.ndim != 2:
        raise InvalidArgumentError(f"logits must be (pos, vocab); got shape {tuple(logits.shape)}.")
    if tokens is not None and tokens.shape[0] != logits.shape[0]:
        raise InvalidArgumentError(f"tokens has {tokens.shape[0]} positions, logits {logits.shape[0]}.")
    if not 1 <= k <= logits.shape[-1]:
        raise InvalidArgumentError(f"k must be between 1 and the vocabulary size; got {k}.")
    # Row blocks of ~1 MB: each block's passes (softmax, entropy, varentropy, top-k) run in cache;
    # over the whole (pos, vocab) array every pass would stream it from memory, ~5× slower here.
    rows_per_block = max(1, _BLOCK_ELEMENTS // logits.shape[-1])
    next_ids = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if tokens is not None:
        next_ids[:-1] = tokens[1:].to(logits.device)
    blocks = [
        block_signals(block.float(), block_next, max(k, 2))
        for block, block_next in zip(logits.split(rows_per_block), next_ids.split(rows_per_block))
    ]
    entropy, varentropy, top_probs, top_ids, surprisal = (torch.cat(parts) for parts in zip(*blocks))
    if tokens is None:
        surprisal.fill_(torch.nan)
    surprisal[-1] = torch.nan  # the last position's next token is unknown
    return TokenSignals(
        entropy=entropy,
        varentropy=varentropy,
        top1_prob=top_probs[:, 0],
        margin=top_probs[:, 0] - top_probs[:, 1],
        surprisal=surprisal,
        top_ids=top_ids[:, :k],
        top_probs=top_probs[:, :k],
    )




_QUERY_BLOCK = 64


def row_entropy(pattern: Float[Tensor, "... key"], *, scratch: Tensor | None = None) -> Float[Tensor, "..."]:
    """−Σ_k a_k ln a_k in nats with torch's own logarithm (before the NumPy log2 kernel)."""
    logs = torch.clamp(pattern, min=torch.finfo(pattern.dtype).tiny, out=scratch)
    return logs.log_().mul_(pattern).sum(-1).neg_()


def _visible_row_entropy(
    pattern: Float[Tensor, "head query key"], layer: LayerAttention, *, scratch: Tensor
) -> Float[Tensor, "head query"]:
    """`row_entropy` of a pattern whose rows see only the keys `layer`'s mask allows, reading for
    each block of queries only the keys between its first query's first visible key and its last
    query's last visible key (the rest are zeros and add nothing): about half the entries of a
    causal pattern at N ≫ 64, a band for a sliding window. If the rows' mass is not all there
    (a pattern attending outside the mask), every key is read instead."""
    n_queries, n_keys = pattern.shape[-2:]
    offset = n_keys - n_queries  # queries are the last positions when keys include a prefix
    starts = torch.arange(0, n_queries, _QUERY_BLOCK)
    firsts = layer.first_visible(starts + offset).tolist()
    lasts = layer.last_visible((starts + _QUERY_BLOCK - 1).clamp_max(n_queries - 1) + offset, n_keys).tolist()
    parts, least_mass = [], 1.0
    for start, first, last in zip(starts.tolist(), firsts, lasts):  # tiles of 64 queries, not single tokens
        visible = pattern[..., start : start + _QUERY_BLOCK, first : last + 1]
        least_mass = min(least_mass, float(visible.sum(-1).min()))
        parts.append(row_entropy(visible, scratch=scratch.view(-1)[: visible.numel()].view(visible.shape)))
    if least_mass < 1.0 - 1e-3:
        return row_entropy(pattern, scratch=scratch)
    return torch.cat(parts, dim=-1)
