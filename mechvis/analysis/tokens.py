"""Token-level signals of the next-token distribution: entropy, varentropy, confidence, margin,
surprisal of the actual next token, and top-k candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis._deprecation import deprecated
from mechvis._validation import activation, cache_and_model, check_bool, check_integer, check_k, check_model, check_tensor
from mechvis.analysis._topk import two_level_topk
from mechvis.analysis.lens import decode_nested
from mechvis.errors import InvalidArgumentError
from mechvis.models.unembedding import INPUT_HOOK, centring_offset
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.running import Run


@dataclass
class TokenSignals(Result):
    """Signals of the distribution predicted at each position (for the token at position + 1).

    All from the temperature-1 distribution p = softmax(logits); entropies in nats.
    `surprisal[t]` is −ln p(token[t + 1]) and NaN at the last position (its next token is unknown).
    """

    units = {'entropy': 'nats', 'varentropy': 'nats²', 'top1_prob': 'probability', 'margin': 'probability', 'surprisal': 'nats', 'top_ids': 'token id', 'top_probs': 'probability'}

    entropy: Float[Tensor, " pos"]
    varentropy: Float[Tensor, " pos"]  # Σ p (−ln p − H)², nats²
    top1_prob: Float[Tensor, " pos"]
    margin: Float[Tensor, " pos"]  # p(1st) − p(2nd)
    surprisal: Float[Tensor, " pos"]
    top_ids: Int[Tensor, "pos k"]
    top_probs: Float[Tensor, "pos k"]

    def highest_entropy(self, n: int = 10) -> list[int]:
        """The `n` positions of highest entropy, highest first (all of them if fewer)."""
        n = check_integer(n, "n", low=1, hint=" (how many positions to return)")
        return self.entropy.argsort(descending=True)[:n].tolist()


_BLOCK_ELEMENTS = 1 << 19  # logits per row block: 2 MB of float32; with its two work buffers it stays in L2/L3 (fewer, larger blocks: half the per-op overhead of 1 MB ones)


def _rows_signals(
    logits: Float[Tensor, "rows vocab"], next_ids: Int[Tensor, " rows"], k: int,
    shifted: Float[Tensor, "rows vocab"], weights: Float[Tensor, "rows vocab"],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One in-cache row block's signals, from one exponential per logit and sums.

    With m the row's largest logit, d = z − m, e = exp(d) and s = Σ e: ln p = d − ln s, so
    H = ln s − c with c = Σ e·d / s (the mean of d under p), varentropy = Σ e·(d − c)² / s (the
    variance of −ln p = ln s − d, centred at its mean: no cancellation), surprisal = m + ln s − z[next],
    top-k probabilities exp(z_top − m − ln s). `torch.exp` is the accurate exponential (~1 ulp);
    torch's CPU (log_)softmax kernels use a faster one off by up to ~1.6e-5 relative, which the
    previous implementation inherited. `shifted` and `weights` (float32, the block's shape) are
    overwritten."""
    top_logits, top_ids = two_level_topk(logits, k)
    peak = top_logits[:, :1]
    shifted = torch.sub(logits, peak, out=shifted)
    weights = torch.exp(shifted, out=weights)
    total = weights.sum(-1)
    centre = torch.linalg.vecdot(weights, shifted) / total
    shifted.sub_(centre[:, None])
    varentropy = torch.linalg.vecdot(weights.mul_(shifted), shifted) / total
    log_total = total.log_()
    entropy = log_total - centre
    log_normaliser = log_total.add_(peak[:, 0])  # ln Σ exp(z)
    top_probs = torch.exp(top_logits - log_normaliser[:, None])
    surprisal = log_normaliser - logits.gather(-1, next_ids[:, None])[:, 0]
    return entropy, varentropy, top_probs, top_ids, surprisal


def block_signals(
    logits: Float[Tensor, "rows vocab"], next_ids: Int[Tensor, " rows"], k: int, scratch: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Signals of any number of rows of float32 logits: (entropy, varentropy, top_probs, top_ids,
    surprisal) per row (surprisal of `next_ids`), computed in row blocks of ~2 MB so that every
    pass runs in cache. `scratch` (float32, contiguous; e.g. a tensor of `logits`' shape) is
    overwritten and used as the blocks' two work buffers when it is large enough, else they are
    allocated once."""
    n_rows, vocab = logits.shape
    rows_per_block = max(1, min(n_rows, _BLOCK_ELEMENTS // vocab))
    size = rows_per_block * vocab
    usable = scratch is not None and scratch.dtype == torch.float32 and scratch.is_contiguous() and scratch.numel() >= 2 * size
    flat = scratch.view(-1) if usable else torch.empty(2 * size, device=logits.device)
    shifted, weights = flat[:size].view(rows_per_block, vocab), flat[size : 2 * size].view(rows_per_block, vocab)
    blocks = [
        _rows_signals(block, block_next, k, shifted[: block.shape[0]], weights[: block.shape[0]])
        for block, block_next in zip(logits.split(rows_per_block), next_ids.split(rows_per_block))
    ]
    return tuple(torch.cat(parts) for parts in zip(*blocks))


def token_signals(
    logits: Float[Tensor, "pos vocab"], tokens: Int[Tensor, " pos"] | None = None, *, k: int = 5
) -> TokenSignals:
    """Signals of each position's next-token distribution; `tokens` (the sequence) gives surprisal.

    Args:
        logits: (pos, vocab) floating-point logits (a numpy array is converted), at least one position.
        tokens: the sequence's token ids, (pos,) (a list or numpy array is converted), or None.
        k: how many top tokens to keep, 1..vocab.

    Raises:
        InvalidArgumentError: logits that are not a non-empty 2-D float tensor, tokens of another
            length or not integers, k not an integer in 1..vocab.
    """
    logits = check_tensor(logits, "logits", ndim=2, shape="(pos, vocab)")
    if tokens is not None:
        tokens = check_tensor(tokens, "tokens", ndim=1, shape="(pos,)", kind="int", lists=True)
        if tokens.shape[0] != logits.shape[0]:
            raise InvalidArgumentError(f"tokens has {tokens.shape[0]} positions, logits {logits.shape[0]}.")
    k = check_k(k, logits.shape[-1])
    next_ids = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if tokens is not None:
        next_ids[:-1] = tokens[1:].to(logits.device)
    entropy, varentropy, top_probs, top_ids, surprisal = block_signals(logits.float(), next_ids, max(k, 2))
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


@dataclass
class HighEntropyPositions(Result):
    """The positions of highest entropy with their top-k candidates, their log-probabilities
    (nats) and logits (the seed's "logits heatmap with top-k at high-entropy tokens").

    `logit_kind` names what `top_logits` holds: "logit" (the model's own logits, equal to the
    plain HF model's) or "centered_logit" (logit − mean logit over the vocabulary, what a
    compatibility-mode bridge outputs)."""

    units = {'entropy': 'nats', 'top_ids': 'token id', 'top_logits': "logit (the model's own) or centred logit: see logit_kind", 'top_log_probs': 'nats (log-probability)'}

    positions: list[int]
    entropy: Float[Tensor, " n"]
    top_ids: Int[Tensor, "n k"]
    top_tokens: list[list[str]]
    top_logits: Float[Tensor, "n k"]
    top_log_probs: Float[Tensor, "n k"]
    logit_kind: str = "logit"


def high_entropy_positions(
    run_or_cache: "Run | ActivationCache",
    *old: object,
    logits: Float[Tensor, "pos vocab"] | None = None,
    n: int = 10,
    k: int = 5,
    own_logits: bool | None = None,
    **deprecated_options: object,
) -> HighEntropyPositions:
    """The `n` highest-entropy positions of a run's logits (or of `logits`, e.g. a prefix of them),
    highest first, with their top-k tokens, log-probabilities and logits; the model is the
    cache's own.

    Args:
        run_or_cache: a Run or Trace (its logits by default) or an ActivationCache (then pass
            `logits`).
        logits: (pos, vocab) logits to rank instead of the run's.
        n: how many positions; k: how many candidates each.
        own_logits: True: `top_logits` are the model's own logits (the cache must hold
            `unembed.hook_in`); False: centred logits; None: the model's own where the cache
            holds the hook.

    The old form `high_entropy_positions(model, logits, *, n, k, cache=None)` still works, with a
    `MechvisDeprecationWarning`.

    Raises:
        InvalidArgumentError: bad logits or k (as `token_signals`), n not a positive integer, a
            cache without logits.
        MissingActivationsError: own_logits=True and a cache without `unembed.hook_in`.
    """
    if _is_model(run_or_cache) or "model" in deprecated_options:
        model = deprecated_options.pop("model", run_or_cache)
        positional = list(old) if "model" not in deprecated_options else [run_or_cache, *old]
        if positional:
            logits = positional.pop(0)
        cache = deprecated_options.pop("cache", None)
        if positional or deprecated_options:
            raise TypeError(f"high_entropy_positions() got unexpected arguments {positional or list(deprecated_options)}.")
        deprecated("high_entropy_positions(model, logits, ...) is deprecated: call high_entropy_positions(run, *, logits=None, "
                   "n=10, k=5, own_logits=None) (the model is the cache's own).", stacklevel=3)
        return _high_entropy_positions(check_model(model), logits, n=n, k=k, cache=cache)
    if old or deprecated_options:
        raise TypeError("high_entropy_positions takes a Run (or a cache) and keyword options: "
                        "high_entropy_positions(run, *, logits=None, n=10, k=5, own_logits=None).")
    cache, model = cache_and_model(run_or_cache, call="high_entropy_positions(run, *, logits=None, n=10, k=5, own_logits=None)")
    if logits is None:
        run = getattr(run_or_cache, "run", run_or_cache)
        logits = getattr(run, "logits", None)
        if logits is None:
            raise InvalidArgumentError("high_entropy_positions needs logits: pass a Run, or logits=... with a cache.")
    own_logits = (INPUT_HOOK in cache) if own_logits is None else check_bool(own_logits, "own_logits")
    return _high_entropy_positions(model, logits, n=n, k=k, cache=cache if own_logits else None)


def _is_model(value: object) -> bool:
    return hasattr(value, "cfg") and hasattr(value, "hook_dict")


def _high_entropy_positions(
    model: "TransformerBridge",
    logits: Float[Tensor, "pos vocab"],
    *,
    n: int = 10,
    k: int = 5,
    cache: "ActivationCache | None" = None,
) -> HighEntropyPositions:
    """The `n` highest-entropy positions of `logits` (a run's logits, or a prefix of them),
    highest first, with their top-k tokens, log-probabilities and logits.

    With `cache` (the same run's, holding `unembed.hook_in`), `top_logits` are
    the model's own logits: the run's logits are centred by compatibility mode, and the mean the
    centring removed is added back (`mechvis.models.unembedding`). Without it they are `logits` minus
    their mean over the vocabulary ("centered_logit": a bridge's logits as they are, unless
    transformer-lens left them uncentred for a soft-capped model).

    Raises:
        InvalidArgumentError: bad logits or k (as `token_signals`), n not a positive integer.
    """
    n = check_integer(n, "n", low=1, hint=" (how many positions to return)")
    logits = check_tensor(logits, "logits", ndim=2, shape="(pos, vocab)")
    k = check_k(k, logits.shape[-1])
    signals = token_signals(logits, k=k)
    positions = signals.highest_entropy(n)
    chosen = logits[positions].float()
    top_logits, top_ids = chosen.topk(k, dim=-1)
    top_log_probs = chosen.log_softmax(-1).gather(-1, top_ids)
    kind = "centered_logit"
    if cache is None:
        top_logits = top_logits - chosen.mean(-1, keepdim=True)  # a bridge's logits are centred already (≈ 0)
    else:
        unembed_input = activation(cache, INPUT_HOOK)[positions]
        with torch.no_grad():
            top_logits = top_logits + centring_offset(model, unembed_input).to(top_logits.device)[:, None]
        kind = "logit"
    return HighEntropyPositions(positions, signals.entropy[positions], top_ids, decode_nested(model, top_ids), top_logits,
                                top_log_probs, kind)
