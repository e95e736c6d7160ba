"""Head entropy, rollout and keyword-span attention against HF attentions, numpy and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens import ActivationCache

import mechvis
from mechvis.analysis import attention_to_spans, head_entropy, rollout, rollout_rows
from mechvis.analysis.spans import find_token_spans
from mechvis.models.architecture import pattern_hook
from mechvis._numerics import row_entropy
from mechvis.errors import InvalidArgumentError
from mechvis.types import Span
from tests.reference import entropy_rows, hf_attentions, rollout_loop

PROMPT = "Write a poem about the sea. The poem must mention the moon and the tide, and the sea must be calm."


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_head_entropy_matches_numpy_on_hf_attentions(tiny, architecture):
    model, reference = tiny(architecture)
    result = mechvis.run(model, PROMPT)
    attentions = hf_attentions(reference, result.tokens.tolist())
    entropy = head_entropy(result.cache, model)
    expected = entropy_rows(attentions)
    np.testing.assert_allclose(entropy.entropy.numpy(), expected, atol=1e-4)
    n = attentions.shape[-1]
    for layer in range(model.cfg.n_layers):
        window = 8 if architecture == "gemma2" and layer % 2 == 0 else n  # Gemma 2: even layers slide
        for query in range(n):
            visible = min(query + 1, window)
            got = entropy.normalised[layer, :, query].numpy()
            if visible == 1:
                assert np.isnan(got).all()
            else:
                np.testing.assert_allclose(got, expected[layer, :, query] / math.log(visible), atol=1e-4)
    np.testing.assert_allclose(entropy.sink_mass.numpy(), attentions[..., 0], atol=1e-5)
    np.testing.assert_allclose(entropy.mean_sink_mass.numpy(), attentions[..., 1:, 0].mean(-1), atol=1e-5)


def _synthetic_cache(model, patterns: torch.Tensor) -> ActivationCache:
    """A cache holding only attention patterns (layer, head, query, key)."""
    return ActivationCache({pattern_hook(layer): patterns[layer][None] for layer in range(patterns.shape[0])}, model)


def _causal_random(n_layers, n_heads, n, seed, concentration):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layers, n_heads, n, n, generator=generator) * concentration
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 24), seed=st.integers(0, 10_000), concentration=st.floats(0.0, 20.0))
def test_entropy_is_between_zero_and_log_visible_keys(tiny_llama, n, seed, concentration):
    model = tiny_llama
    patterns = _causal_random(model.cfg.n_layers, model.cfg.n_heads, n, seed, concentration)
    entropy = head_entropy(_synthetic_cache(model, patterns), model)
    bound = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
    assert (entropy.entropy >= -1e-6).all() and (entropy.entropy <= bound + 1e-5).all()
    valid = entropy.normalised[..., 1:]
    assert (valid >= -1e-6).all() and (valid <= 1 + 1e-5).all()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 24), hot=st.data())
def test_one_hot_rows_have_zero_entropy_and_uniform_rows_the_maximum(tiny_llama, n, hot):
    model = tiny_llama
    one_hot = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, n, n)
    for query in range(n):
        one_hot[..., query, hot.draw(st.integers(0, query))] = 1.0
    assert head_entropy(_synthetic_cache(model, one_hot), model).entropy.abs().max() == 0
    uniform = torch.ones(n, n).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(model.cfg.n_layers, model.cfg.n_heads, n, n)
    entropy = head_entropy(_synthetic_cache(model, uniform), model)
    torch.testing.assert_close(entropy.entropy[0, 0], torch.log(torch.arange(1, n + 1, dtype=torch.float32)))
    torch.testing.assert_close(entropy.normalised[..., 1:], torch.ones_like(entropy.normalised[..., 1:]))


def test_classification_separates_sink_focused_and_diffuse_heads(tiny_llama):
    model = tiny_llama
    n = 12
    patterns = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, n, n)
    patterns[..., 0] = 1.0  # every head: all mass on the first token (a sink)
    patterns[0, 1] = torch.eye(n)  # layer 0 head 1: attends to itself only (focused)
    uniform = torch.ones(n, n).tril()
    patterns[0, 2] = uniform / uniform.sum(-1, keepdim=True)  # layer 0 head 2: diffuse
    kinds = {(layer, head): kind for layer, head, kind in head_entropy(_synthetic_cache(model, patterns), model).classify()}
    assert kinds[(0, 0)] == "sink" and kinds[(0, 1)] == "focused" and kinds[(0, 2)] == "diffuse"


def test_row_entropy_known_values():
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    torch.testing.assert_close(row_entropy(rows), torch.tensor([0.0, math.log(2), math.log(4)]))


@pytest.mark.parametrize("n_queries, n_keys, causal", [(150, 150, True), (70, 100, True), (150, 150, False)])
def test_block_causal_entropy_equals_numpy_on_every_row(n_queries, n_keys, causal):
    """The block-causal path reads only visible keys; a pattern with mass ahead of the diagonal
    (not causal) must fall back to every key, not lose that mass."""
    from mechvis.analysis.attention import _visible_row_entropy
    from mechvis.models.architecture import LayerAttention
    from tests.reference import entropy_rows

    generator = torch.Generator().manual_seed(n_queries + n_keys)
    scores = torch.randn(3, n_queries, n_keys, generator=generator) * 3
    if causal:
        ahead = torch.ones(n_queries, n_keys, dtype=torch.bool).triu(n_keys - n_queries + 1)
        scores = scores.masked_fill(ahead, float("-inf"))
    pattern = scores.softmax(-1)
    got = _visible_row_entropy(pattern, LayerAttention("full"), scratch=torch.empty_like(pattern))
    expected = entropy_rows(pattern.double().numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_rollout_matches_the_plain_loop_on_hf_attentions(tiny):
    model, reference = tiny("llama")
    result = mechvis.run(model, PROMPT)
    expected = rollout_loop(hf_attentions(reference, result.tokens.tolist()), 0.5)
    got = rollout(result.cache, model)
    np.testing.assert_allclose(got.matrix.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(rollout(result.cache, model, residual_weight=0.2).matrix.numpy(),
                               rollout_loop(hf_attentions(reference, result.tokens.tolist()), 0.2), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 20), seed=st.integers(0, 10_000), fusion=st.sampled_from(["mean", "max", "min"]),
       weight=st.floats(0.0, 1.0))
def test_rollout_rows_sum_to_one(tiny_llama, n, seed, fusion, weight):
    model = tiny_llama
    patterns = _causal_random(model.cfg.n_layers, model.cfg.n_heads, n, seed, 3.0)
    result = rollout(_synthetic_cache(model, patterns), model, head_fusion=fusion, residual_weight=weight)
    torch.testing.assert_close(result.matrix.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
    assert (result.matrix >= 0).all() and (result.matrix.triu(1) == 0).all()  # causal: no future mass


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 20), weight=st.floats(0.0, 1.0))
def test_identity_attention_gives_identity_rollout(tiny_llama, n, weight):
    model = tiny_llama
    identity = torch.eye(n).expand(model.cfg.n_layers, model.cfg.n_heads, n, n)
    torch.testing.assert_close(rollout(_synthetic_cache(model, identity), model, residual_weight=weight).matrix, torch.eye(n))


def test_rollout_key_span_and_bad_input(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    full = rollout(result.cache, model)
    span = Span("keyword", 2, 6)
    restricted = rollout(result.cache, model, key_span=span)
    torch.testing.assert_close(restricted.span_mass, full.matrix[:, 2:6].sum(-1))
    later = slice(6, None)
    torch.testing.assert_close(restricted.matrix[later].sum(-1), torch.ones(len(result.tokens) - 6))
    with pytest.raises(InvalidArgumentError, match="head_fusion"):
        rollout(result.cache, model, head_fusion="median")
    with pytest.raises(InvalidArgumentError, match="residual_weight"):
        rollout(result.cache, model, residual_weight=1.5)
    with pytest.raises(InvalidArgumentError, match="layer"):
        rollout(result.cache, model, layers=[0, 3])
    with pytest.raises(InvalidArgumentError, match="outside"):
        rollout(result.cache, model, key_span=Span("keyword", 0, 500))


def test_rollout_rows_equal_the_rows_of_the_hf_rollout(tiny):
    model, reference = tiny("llama")
    result = mechvis.run(model, PROMPT)
    n = len(result.tokens)
    for weight, fusion in ((0.5, "mean"), (0.2, "mean")):
        expected = rollout_loop(hf_attentions(reference, result.tokens.tolist()), weight)  # numpy, from HF eager
        got = rollout_rows(result.cache, model, [0, n // 2, -1], residual_weight=weight, head_fusion=fusion)
        assert got.queries == [0, n // 2, n - 1]
        np.testing.assert_allclose(got.rows.numpy(), expected[[0, n // 2, n - 1]], atol=1e-5)
    for fusion in ("max", "min"):
        full = rollout(result.cache, model, head_fusion=fusion, layers=[1, 0], key_span=Span("keyword", 2, 6))
        rows = rollout_rows(result.cache, model, [5, 7, -1], head_fusion=fusion, layers=[1, 0], key_span=Span("keyword", 2, 6))
        torch.testing.assert_close(rows.rows, full.matrix[[5, 7, n - 1]], atol=1e-6, rtol=0)
        torch.testing.assert_close(rows.span_mass, full.span_mass[[5, 7, n - 1]], atol=1e-6, rtol=0)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        rollout_rows(result.cache, model, [n])
    with pytest.raises(InvalidArgumentError, match="at least one"):
        rollout_rows(result.cache, model, [])
    for query in (1.5, True, "2", torch.tensor(True)):
        with pytest.raises(InvalidArgumentError, match="is not an integer"):
            rollout_rows(result.cache, model, [query])
    with pytest.raises(InvalidArgumentError, match="must be a list of integers"):
        rollout_rows(result.cache, model, 3)
    # integer-likes are integers: numpy integers, integer tensors (a position taken from `tokens`)
    expected = rollout_rows(result.cache, model, [2, n - 1]).rows
    for queries in ([np.int64(2), np.int32(-1)], torch.tensor([2, -1]), np.array([2, n - 1])):
        torch.testing.assert_close(rollout_rows(result.cache, model, queries).rows, expected, atol=0, rtol=0)


def test_keyword_spans_find_every_occurrence_of_multi_token_words(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    for keyword, count in (("sea", 2), ("poem", 2), ("Moon", 1), ("tide", 1)):
        spans = find_token_spans(result, keyword)
        assert len(spans) == count
        for span in spans:
            assert "".join(result.str_tokens[span.start : span.stop]).strip().lower() == keyword.lower()
    assert find_token_spans(result, "Moon", case_sensitive=True) == []
    assert len(find_token_spans(result, "se", whole_word=False)) == 2  # inside "sea" twice
    long_prompt = mechvis.run(model, "Antidisestablishmentarianism is long; antidisestablishmentarianism again.")
    spans = find_token_spans(long_prompt, "antidisestablishmentarianism")
    assert len(spans) == 2 and all(len(span) > 1 for span in spans)  # a word of several tokens


def test_attention_to_spans_matches_hf_attentions(tiny):
    model, reference = tiny("llama")
    result = mechvis.run(model, PROMPT)
    spans = find_token_spans(result, "sea")
    keys = [p for span in spans for p in span.positions]
    queries = [len(result.tokens) - 3, len(result.tokens) - 1]
    focus = attention_to_spans(result.cache, model, spans, query_positions=queries)
    expected = hf_attentions(reference, result.tokens.tolist())[:, :, queries][..., keys].sum(-1)
    np.testing.assert_allclose(focus.mass.numpy(), expected, atol=1e-5)
    top_layer, top_head, top_mass = focus.ranked_heads(1)[0]
    assert top_mass == pytest.approx(expected.mean(-1).max(), abs=1e-5)
    assert expected.mean(-1)[top_layer, top_head] == pytest.approx(top_mass, abs=1e-5)
    with pytest.raises(InvalidArgumentError, match="No key positions"):
        attention_to_spans(result.cache, model, [])
    with pytest.raises(InvalidArgumentError, match="empty"):
        find_token_spans(result, "  ")
