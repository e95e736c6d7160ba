"""mechvis's vectorised token and attention metrics versus a per-token Python loop of the same
formulas in PyTorch (the seed's style), at N = 512 tokens on the embedded model's activations."""

from __future__ import annotations

import time

import numpy as np
import torch

import mechvis
from mechvis.analysis import head_entropy, hooks_for, token_signals

N_TOKENS = 512


def _loop_token_signals(logits: torch.Tensor, tokens: torch.Tensor) -> list[tuple[float, ...]]:
    """The seed's style: one token at a time, PyTorch ops on its row."""
    values = []
    for t in range(logits.shape[0]):
        log_p = torch.log_softmax(logits[t], -1)
        p = log_p.exp()
        entropy = -(p * log_p).sum()
        varentropy = (p * (-log_p - entropy) ** 2).sum()
        top = torch.topk(p, 2).values
        surprisal = -log_p[tokens[t + 1]] if t + 1 < len(tokens) else torch.tensor(float("nan"))
        values.append((entropy.item(), varentropy.item(), top[0].item(), (top[0] - top[1]).item(), surprisal.item()))
    return values


def _loop_head_entropy(patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's style: one attention row (layer, head, query) at a time."""
    n_layers, n_heads, n, _ = patterns.shape
    normalised = torch.full((n_layers, n_heads, n), float("nan"))
    sink = torch.zeros(n_layers, n_heads, n)
    for layer in range(n_layers):
        for head in range(n_heads):
            for query in range(n):
                row = patterns[layer, head, query, : query + 1]
                sink[layer, head, query] = row[0]
                if query > 0:
                    entropy = -(row * torch.log(row + 1e-30)).sum()
                    normalised[layer, head, query] = entropy / torch.log(torch.tensor(query + 1.0))
    return normalised, sink


def _best_of(repeats: int, function):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    model = mechvis.load_model(device="cpu")
    prompt = " ".join(["The history of the river valley is long and full of surprises."] * 60)
    token_ids = mechvis.encode(model, prompt).token_ids[:N_TOKENS]
    text = model.hf_tokenizer.decode(token_ids)
    result = mechvis.run(model, text, names_filter=hooks_for(model, "attention"))
    n = len(result.tokens)
    logits = result.logits
    patterns = torch.stack([result.cache[f"blocks.{i}.attn.hook_pattern"][0] for i in range(model.cfg.n_layers)])

    ours_tokens, signals = _best_of(3, lambda: token_signals(logits, result.tokens))
    loop_tokens, loop_signals = _best_of(1, lambda: _loop_token_signals(logits, result.tokens))
    np.testing.assert_allclose(signals.entropy.numpy(), [row[0] for row in loop_signals], atol=1e-3)

    ours_heads, entropy = _best_of(3, lambda: head_entropy(result.cache))
    loop_heads, (loop_normalised, loop_sink) = _best_of(1, lambda: _loop_head_entropy(patterns))
    np.testing.assert_allclose(entropy.normalised[..., 1:].numpy(), loop_normalised[..., 1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(entropy.sink_mass.numpy(), loop_sink.numpy(), atol=1e-6)

    print(f"metrics at N = {n} tokens ({model.cfg.n_layers} layers × {model.cfg.n_heads} heads):")
    print(f"  token signals (entropy, varentropy, top-1, margin, surprisal): mechvis {ours_tokens * 1e3:.0f} ms, "
          f"per-token loop {loop_tokens * 1e3:.0f} ms, ratio {loop_tokens / ours_tokens:.1f}×")
    print(f"  head entropy (normalised, sink mass): mechvis {ours_heads * 1e3:.0f} ms, "
          f"per-row loop {loop_heads * 1e3:.0f} ms, ratio {loop_heads / ours_heads:.0f}×")
