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

from mechvis._validation import activation, analysis_form, check_bool, check_k, check_model, check_positions
from mechvis.analysis._topk import two_level_topk
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.text import single_token_id, vocabulary_strings

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge


_BLOCK_ELEMENTS = 1 << 18  # float64 numbers per row block: 2 MB, small enough to stay in cache


def unembed_logits(model: "TransformerBridge", residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits the model would output if `residual` were its final residual stream: the final
    norm recomputed on `residual`, the unembedding, and the model's logit soft-cap if any.

    Raises:
        InvalidArgumentError: `residual` not a float tensor whose last dimension is d_model."""
    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point() or residual.ndim == 0 \
            or residual.shape[-1] != model.cfg.d_model:
        got = f"shape {tuple(residual.shape)}, {residual.dtype}" if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise InvalidArgumentError(f"residual must be a float tensor (..., d_model={model.cfg.d_model}); got {got}.")
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
class LogitLens(Result):
    """The logit lens over layers × positions. Probabilities are in [0, 1]; entropies and KL in nats.

    Rows are `layer_labels`: "embed" (the token embeddings), then "0", "1", ... (each block's
    output, resid_post) with "i.mid" (after block i's attention) when requested. The last row is
    the model's own output distribution.
    """

    units = {'top_ids': 'token id', 'top_probs': 'probability', 'target_ids': 'token id', 'target_probs': 'probability', 'target_ranks': "rank (0 = the layer's top token)", 'entropy': 'nats', 'kl_from_final': 'nats', 'max_probs': 'probability'}

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


@analysis_form('logit_lens(run_or_cache, *, positions=None, target=None, k=5, include_resid_mid=False)')
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
        k: how many top tokens to keep per layer and position (1..vocab).

    Raises:
        InvalidArgumentError: k not an integer in 1..vocab, bad positions or target.
        MissingActivationsError: a cache without the residual-stream hooks.
    """
    k = check_k(k, check_model(model).cfg.d_vocab)
    include_resid_mid = check_bool(include_resid_mid, "include_resid_mid")
    names = lens_hook_names(model, include_resid_mid)
    first = activation(cache, names[0])
    chosen = check_positions(first.shape[0], positions)
    index = torch.tensor(chosen, device=first.device)
    # In float64 (KL at early layers reaches ~100 nats, where float32 loses the fourth decimal),
    # one layer at a time (layers × positions × vocab would not fit for long inputs), and within a
    # layer in blocks of rows small enough that every pass after the matmul runs in cache: over a
    # whole (pos, vocab) float64 array each pass would stream it from memory. Every pass writes
    # into the same reused buffers (a fresh 2 MB array per block and pass costs more in page
    # faults than its arithmetic). One softmax per row; no logarithm or exponential per token
    # after it (see `block_rows`). Top-k, the final top-1 and target ranks are taken on the float32
    # logits (top-k in two levels, `two_level_topk`): in float64, ln p = z − constant keeps the
    # order of the float32 logits and their ties.
    final_logits = unembed_logits(model, activation(cache, names[-1])[index]).float()
    vocab = final_logits.shape[-1]
    rows_per_block = max(1, min(len(chosen), _BLOCK_ELEMENTS // vocab))
    wide, products, probs_buffer = (
        torch.empty(rows_per_block, vocab, dtype=torch.float64, device=final_logits.device) for _ in range(3)
    )
    above = torch.empty(rows_per_block, vocab, dtype=torch.bool, device=final_logits.device)
    keys = ("top_p", "top_i", "tp", "tr", "h", "kl", "mx")

    def float64_probs(block: Tensor, probs: Tensor | None = None) -> Tensor:
        """p of a float32 block, in float64 (the block's float64 copy is left in `wide`)."""
        n_rows = block.shape[0]
        wide[:n_rows].copy_(block)
        if probs is None:
            return torch.softmax(wide[:n_rows], -1)
        return torch.softmax(wide[:n_rows], -1, out=probs)

    def block_rows(block: Tensor, probs: Tensor, targets: Tensor, final_probs: Tensor | None,
                   final_term: Tensor | None, parts: dict[str, list[Tensor]]) -> Tensor:
        """Append one row block's values to `parts` (`wide` holds its float64 logits; `wide`'s
        neighbour buffers and `above` are overwritten); returns Σ p ln p (from the layer's own p).

        With m the row's largest logit, p(m) = 1 / Σ exp(z − m), so ln Σ exp(z) = m − ln p(m) and
        ln p = z − ln Σ exp(z) without a logarithm per token: Σ p ln p = Σ p z − ln Σ exp(z), and
        Σ p_final ln p_layer = Σ p_final z_layer − ln Σ exp(z_layer) (Σ p_final = 1 to ~1e-16)."""
        n_rows = block.shape[0]
        logits = wide[:n_rows]
        top_logits, top_ids = two_level_topk(block, k)
        log_normaliser = top_logits[:, :1].double() - probs.gather(-1, top_ids[:, :1]).log()
        top_probs = (top_logits.double() - log_normaliser).exp_()
        target_logits = block.gather(-1, targets[:, None])
        own_term = torch.mul(probs, logits, out=products[:n_rows]).sum(-1) - log_normaliser[:, 0]
        parts["top_p"].append(top_probs)
        parts["top_i"].append(top_ids)
        parts["tp"].append((target_logits.double() - log_normaliser)[:, 0].exp())
        parts["tr"].append(torch.gt(block, target_logits, out=above[:n_rows]).sum(-1))
        parts["h"].append(-own_term)
        if final_probs is None:  # the final layer itself
            final_probs, final_term = probs, own_term
        cross = torch.mul(final_probs, logits, out=products[:n_rows]).sum(-1) - log_normaliser[:, 0]
        parts["kl"].append(final_term - cross)
        parts["mx"].append(top_probs[:, 0])
        return own_term

    # The final layer first: its probabilities (kept, one float64 block per row block) give every
    # layer's KL(p_final ‖ p_layer) = Σ p_final ln p_final − Σ p_final ln p_layer, and its rows are
    # the lens's last row (decoded once).
    fixed_target = None if target is None else single_token_id(model, target)
    final_probs_blocks, final_terms, target_blocks = [], [], []
    final_parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    for block in final_logits.split(rows_per_block):
        probs = float64_probs(block)
        if fixed_target is None:
            targets = block.argmax(-1)  # the first of equal maxima, as on the log-probabilities
        else:
            targets = torch.full((block.shape[0],), fixed_target, dtype=torch.long, device=block.device)
        final_terms.append(block_rows(block, probs, targets, None, None, final_parts))
        final_probs_blocks.append(probs)
        target_blocks.append(targets)
    del final_logits
    target_ids = torch.cat(target_blocks)

    rows: dict[str, list[Tensor]] = {key: [] for key in keys}
    for name in names[:-1]:
        logits = unembed_logits(model, activation(cache, name)[index]).float()
        parts: dict[str, list[Tensor]] = {key: [] for key in keys}
        for block, targets, final_probs, final_term in zip(
            logits.split(rows_per_block), target_blocks, final_probs_blocks, final_terms
        ):
            probs = float64_probs(block, probs_buffer[: block.shape[0]])
            block_rows(block, probs, targets, final_probs, final_term, parts)
        del logits
        for key, values in parts.items():
            rows[key].append(torch.cat(values))
    for key, values in final_parts.items():
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
