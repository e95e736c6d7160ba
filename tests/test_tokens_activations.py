"""Token signals and activation statistics against numpy written from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import mechvis
from mechvis.analysis import activation_norms, activation_statistics, high_entropy_positions, token_signals
from mechvis.errors import InvalidArgumentError
from tests.reference import hf_forward


def _numpy_signals(logits: np.ndarray, tokens: np.ndarray):
    rows = []
    for t, row in enumerate(logits.astype(np.float64)):
        p = np.exp(row - row.max())
        p /= p.sum()
        log_p = np.log(p)
        entropy = -(p * log_p).sum()
        varentropy = (p * (-log_p - entropy) ** 2).sum()
        ordered = np.sort(p)[::-1]
        surprisal = -log_p[tokens[t + 1]] if t + 1 < len(tokens) else np.nan
        rows.append((entropy, varentropy, ordered[0], ordered[0] - ordered[1], surprisal))
    return np.array(rows).T


def test_token_signals_match_numpy(tiny):
    model, reference = tiny("qwen2")
    result = mechvis.run(model, "Once upon a time there was a little robot who")
    hf_logits = hf_forward(reference, result.tokens.tolist()).logits[0].numpy()
    expected = _numpy_signals(hf_logits, result.tokens.numpy())
    signals = token_signals(result.logits, result.tokens, k=4)
    got = np.stack([signals.entropy, signals.varentropy, signals.top1_prob, signals.margin, signals.surprisal])
    np.testing.assert_allclose(got, expected, atol=1e-4, equal_nan=True)
    assert np.isnan(signals.surprisal[-1])
    assert signals.top_ids.shape == (len(result.tokens), 4)
    high = high_entropy_positions(model, result.logits, n=3, k=2)
    # A random model's entropies nearly tie, so compare the selected values, not the order of ties.
    np.testing.assert_allclose(high.entropy.numpy(), np.sort(expected[0])[::-1][:3], atol=1e-4)
    np.testing.assert_allclose(expected[0][high.positions], high.entropy.numpy(), atol=1e-4)
    assert high.top_tokens[0][0] == model.hf_tokenizer.decode([high.top_ids[0, 0].item()])


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 50)), elements=st.floats(-30, 30, width=32)))
def test_signal_invariants(logits):
    signals = token_signals(torch.from_numpy(logits), k=2)
    vocab = logits.shape[1]
    assert (signals.entropy >= -1e-5).all() and (signals.entropy <= math.log(vocab) + 1e-4).all()
    assert (signals.varentropy >= -1e-5).all()
    assert (signals.margin >= 0).all() and (signals.margin <= 1).all()
    assert (signals.top1_prob >= 1 / vocab - 1e-6).all()


def test_uniform_and_peaked_distributions():
    uniform = token_signals(torch.zeros(2, 100))
    torch.testing.assert_close(uniform.entropy, torch.full((2,), math.log(100)))
    torch.testing.assert_close(uniform.varentropy, torch.zeros(2), atol=1e-5, rtol=0)
    peaked = torch.full((1, 100), -1e4)
    peaked[0, 7] = 0
    signals = token_signals(peaked)
    assert signals.entropy.item() == pytest.approx(0, abs=1e-6) and signals.top_ids[0, 0] == 7
    assert signals.margin.item() == pytest.approx(1.0)


def test_token_signals_bad_input():
    with pytest.raises(InvalidArgumentError, match="pos, vocab"):
        token_signals(torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="positions"):
        token_signals(torch.zeros(3, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="k must"):
        token_signals(torch.zeros(3, 10), k=11)


def test_activation_norms_match_hf_hidden_states(tiny):
    model, reference = tiny("llama")
    result = mechvis.run(model, "The sun rises in the east and sets in the west")
    hidden = hf_forward(reference, result.tokens.tolist()).hidden_states
    expected = np.stack([h[0].double().norm(dim=-1).numpy() for h in hidden[1:-1]])  # HF's last is normalised
    norms = activation_norms(result.cache, model, "resid_post")
    np.testing.assert_allclose(norms.norms[:-1].numpy(), expected, rtol=1e-5)
    full = norms.norms.double().numpy()
    np.testing.assert_allclose(norms.change_rate.numpy(), (full[1:] - full[:-1]) / full[:-1], rtol=1e-5)
    mlp = activation_norms(result.cache, model, "mlp_out")
    assert mlp.norms.shape == (3, len(result.tokens))
    with pytest.raises(InvalidArgumentError, match="kind"):
        activation_norms(result.cache, model, "resid_pre_typo")


def test_activation_statistics_match_numpy(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, "Statistics of activations across layers")
    stats = activation_statistics(result.cache, model, "mlp_post")
    for layer in range(3):
        values = result.cache[f"blocks.{layer}.mlp.hook_post"][0].double().numpy().ravel()
        centred = values - values.mean()
        assert stats.mean[layer].item() == pytest.approx(values.mean(), abs=1e-6)
        assert stats.std[layer].item() == pytest.approx(values.std(), rel=1e-5)
        assert stats.kurtosis[layer].item() == pytest.approx((centred**4).mean() / values.var() ** 2 - 3, rel=1e-4)
        np.testing.assert_allclose(stats.percentiles[layer].numpy(), np.percentile(values, stats.percentile_levels), rtol=1e-5, atol=1e-7)
