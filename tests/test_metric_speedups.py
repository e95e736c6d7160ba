"""Issue 18's faster logit lens, token signals and head entropy compute what the previous
implementations (tests/previous_metrics.py, kept verbatim) computed on the same inputs."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.analysis import head_entropy, hooks_for, logit_lens, token_signals
from tests import previous_metrics

PROMPT = ("The river valley is long, and the history of the river valley is full of surprises that "
          "nobody who walked along the river valley expected. ") * 3


def _assert_lens_equal(new, old) -> None:
    assert new.layer_labels == old.layer_labels and new.positions == old.positions
    assert torch.equal(new.target_ids, old.target_ids)
    assert torch.equal(new.top_ids, old.top_ids) and new.top_tokens == old.top_tokens
    assert torch.equal(new.target_ranks, old.target_ranks)
    for field in ("top_probs", "target_probs", "entropy", "max_probs"):
        torch.testing.assert_close(getattr(new, field), getattr(old, field), atol=1e-7, rtol=1e-6, msg=field)
    torch.testing.assert_close(new.kl_from_final, old.kl_from_final, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma2"])
def test_logit_lens_equals_the_previous_implementation(tiny, architecture):
    model, _ = tiny(architecture)
    result = mechvis.run(model, PROMPT, names_filter=hooks_for(model, "lens"))
    _assert_lens_equal(logit_lens(result.cache, model, k=4), previous_metrics.logit_lens(result.cache, model, k=4))
    kwargs = dict(positions=[0, 5, -1], target=7, include_resid_mid=True)
    _assert_lens_equal(logit_lens(result.cache, model, **kwargs), previous_metrics.logit_lens(result.cache, model, **kwargs))


def _assert_signals_equal(new, old) -> None:
    for field in ("entropy", "varentropy", "top1_prob", "margin", "surprisal", "top_probs"):
        torch.testing.assert_close(getattr(new, field), getattr(old, field), atol=0, rtol=0,
                                   equal_nan=True, msg=field)  # bit-identical
    assert torch.equal(new.top_ids, old.top_ids)


def test_token_signals_equal_the_previous_implementation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 1000, generator=generator) * torch.linspace(0.1, 8, 40)[:, None]
    tokens = torch.randint(0, 1000, (40,), generator=generator)
    _assert_signals_equal(token_signals(logits, tokens, k=5), previous_metrics.token_signals(logits, tokens, k=5))
    _assert_signals_equal(token_signals(logits, k=1), previous_metrics.token_signals(logits, k=1))
    wide = torch.randn(7, 49_152, generator=generator) * 4
    _assert_signals_equal(token_signals(wide, torch.arange(7)), previous_metrics.token_signals(wide, torch.arange(7)))


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_visible_row_entropy_equals_the_previous_implementation(tiny, architecture):
    """Bit-identical per layer, on causal and sliding-window (Gemma 2, window 8) layers, and on a
    pattern with mass outside the mask (the fallback to every key)."""
    from mechvis.analysis.attention import _visible_row_entropy
    from mechvis.architecture import attention_layout

    model, _ = tiny(architecture)
    result = mechvis.run(model, PROMPT, names_filter=hooks_for(model, "attention"))
    layout = attention_layout(model)
    for layer in range(model.cfg.n_layers):
        pattern = result.cache[f"blocks.{layer}.attn.hook_pattern"][0]
        uniform = torch.full_like(pattern, 1.0 / pattern.shape[-1])  # attends outside any mask
        for case in (pattern, uniform):
            new = _visible_row_entropy(case, layout[layer], scratch=torch.empty_like(case))
            old = previous_metrics._visible_row_entropy(case, layout[layer], scratch=torch.empty_like(case))
            assert torch.equal(new, old)


@pytest.mark.integration
def test_embedded_metrics_equal_the_previous_implementations(embedded):
    result = mechvis.run(embedded, PROMPT, names_filter=hooks_for(embedded, "lens", "attention"))
    _assert_lens_equal(logit_lens(result.cache, embedded), previous_metrics.logit_lens(result.cache, embedded))
    _assert_signals_equal(token_signals(result.logits, result.tokens),
                          previous_metrics.token_signals(result.logits, result.tokens))
    layers = head_entropy(result.cache, embedded)
    from mechvis.architecture import attention_layout

    layout = attention_layout(embedded)
    for layer in range(embedded.cfg.n_layers):
        pattern = result.cache[f"blocks.{layer}.attn.hook_pattern"][0]
        expected = previous_metrics._visible_row_entropy(pattern, layout[layer], scratch=torch.empty_like(pattern))
        assert torch.equal(layers.entropy[layer], expected)
