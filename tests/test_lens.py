"""Logit lens against the plain HF model's hidden states decoded by hand."""

from __future__ import annotations

import numpy as np
import pytest

import mechvis
from mechvis.analysis import hooks_for, logit_lens
from mechvis.errors import InvalidArgumentError, MissingActivationsError
from tests.reference import hf_lens_log_probs

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to"


def _check_against_reference(model, reference, result, tolerance=1e-4):
    log_probs = hf_lens_log_probs(reference, result.tokens.tolist())  # (layer, pos, vocab)
    lens = logit_lens(result.cache, model, k=5)
    probs = np.exp(log_probs)
    final = log_probs[-1]
    targets = final.argmax(-1)
    positions = np.arange(log_probs.shape[1])
    expected_entropy = -(probs * log_probs).sum(-1)
    expected_kl = (np.exp(final) * (final - log_probs)).sum(-1)
    expected_target = probs[:, positions, targets]
    expected_rank = (log_probs > log_probs[:, positions, targets][..., None]).sum(-1)
    expected_top = -np.sort(-probs, axis=-1)[..., :5]
    assert lens.layer_labels == ["embed"] + [str(i) for i in range(model.cfg.n_layers)]
    np.testing.assert_allclose(lens.entropy.numpy(), expected_entropy, atol=tolerance)
    np.testing.assert_allclose(lens.kl_from_final.numpy(), expected_kl, atol=tolerance)
    np.testing.assert_allclose(lens.target_probs.numpy(), expected_target, atol=tolerance)
    np.testing.assert_allclose(lens.top_probs.numpy(), expected_top, atol=tolerance)
    np.testing.assert_allclose(lens.max_probs.numpy(), expected_top[..., 0], atol=tolerance)
    np.testing.assert_allclose(lens.confidence.numpy(), expected_top[..., 0].mean(-1), atol=tolerance)
    # Ranks can differ only where two logits tie within float error.
    assert (np.abs(lens.target_ranks.numpy() - expected_rank) <= 1).all()
    assert (lens.target_ranks[-1] == 0).all()
    return lens


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "gemma2"])
def test_every_layer_matches_hf_hidden_states(tiny, architecture):
    model, reference = tiny(architecture)
    _check_against_reference(model, reference, mechvis.run(model, PROMPT))


def test_last_layer_equals_the_models_own_distribution(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    lens = logit_lens(result.cache, model, k=3)
    model_probs = result.logits.softmax(-1)
    np.testing.assert_allclose(lens.top_probs[-1].numpy(), model_probs.topk(3).values.numpy(), atol=1e-6)
    assert (lens.kl_from_final[-1].abs() < 1e-6).all()
    assert lens.top_tokens[-1][0][0] == model.hf_tokenizer.decode([lens.top_ids[-1, 0, 0].item()])


def test_target_token_positions_and_resid_mid(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    lens = logit_lens(result.cache, model, positions=[-1, 2], target=" the", include_resid_mid=True)
    assert lens.positions == [len(result.tokens) - 1, 2]
    assert lens.layer_labels == ["embed", "0.mid", "0", "1.mid", "1", "2.mid", "2"]
    the_id = model.hf_tokenizer.encode(" the", add_special_tokens=False)[0]
    assert (lens.target_ids == the_id).all()
    expected = result.logits[[-1, 2]].softmax(-1)[:, the_id]
    np.testing.assert_allclose(lens.target_probs[-1].numpy(), expected.numpy(), atol=1e-6)


def test_names_filter_for_the_lens_is_enough(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT, names_filter=hooks_for(model, "lens"))
    assert logit_lens(result.cache, model).entropy.shape == (4, len(result.tokens))


def test_bad_input(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT, names_filter=hooks_for(model, "attention"))
    with pytest.raises(MissingActivationsError, match="names_filter"):
        logit_lens(result.cache, model)
    full = mechvis.run(model, PROMPT)
    with pytest.raises(InvalidArgumentError, match="not one"):
        logit_lens(full.cache, model, target=" internationalisation")
    with pytest.raises(InvalidArgumentError, match="position 99"):
        logit_lens(full.cache, model, positions=[99])
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        logit_lens(full.cache, model, target=10**6)


@pytest.mark.integration
def test_embedded_model_lens_matches_hf(embedded, embedded_reference):
    result = mechvis.run(embedded, "The capital of France is")
    lens = _check_against_reference(embedded, embedded_reference, result)
    assert lens.top_tokens[-1][-1][0] == " Paris"
    # The answer emerges in late layers: its final-position rank falls to 0 only at the end.
    paris = logit_lens(result.cache, embedded, positions=[-1], target=" Paris")
    assert paris.target_ranks[0, 0] > 100 and paris.target_ranks[-1, 0] == 0


def test_a_target_id_may_be_any_integer_like(tiny):
    """A target taken from the run's own tokens (a 0-d tensor, a numpy integer) is an id; bools,
    floats and multi-token strings are refused."""
    import torch

    model, _ = tiny("llama")
    result = mechvis.run(model, "The cat sat on the mat", names_filter=hooks_for(model, "lens"))
    token = int(result.tokens[-1])
    expected = logit_lens(result.cache, model, target=token).target_probs
    for like in (result.tokens[-1], np.int64(token), torch.tensor([token])[0]):
        assert torch.equal(logit_lens(result.cache, model, target=like).target_probs, expected)
    for bad in (True, float(token), torch.tensor(True)):
        with pytest.raises(InvalidArgumentError, match="A token is an id or a string"):
            logit_lens(result.cache, model, target=bad)
    assert len(mechvis.generate(model, "Hello", max_new_tokens=np.int64(3)).generated_ids) <= 3
    with pytest.raises(InvalidArgumentError, match="max_new_tokens must be a positive integer"):
        mechvis.generate(model, "Hello", max_new_tokens=True)
    # sampling settings too: numpy numbers are numbers, bools and strings are not
    sampled = mechvis.generate(model, "Hello", max_new_tokens=3, temperature=np.float32(0.7), top_k=np.int64(5), seed=1)
    assert sampled.settings.temperature == pytest.approx(0.7) and sampled.settings.top_k == 5
    for bad in (dict(temperature=True), dict(temperature="1"), dict(temperature=1, top_k=True)):
        with pytest.raises(InvalidArgumentError, match="temperature|top_k"):
            mechvis.generate(model, "Hello", max_new_tokens=2, **bad)
