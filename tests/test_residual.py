"""Residual decomposition, head results, DLA and layer similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechvis
from mechvis.analysis import decompose_residual, direct_logit_attribution, head_results, layer_similarity
from mechvis.errors import InvalidArgumentError
from tests.reference import hf_forward

PROMPT = "When John and Mary went to the store, John gave a drink to"


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("heads", [False, True])
def test_components_sum_to_the_residual_stream(tiny, architecture, heads):
    model, _ = tiny(architecture)
    result = mechvis.run(model, PROMPT)
    final = result.cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0]
    decomposition = decompose_residual(result.cache, model, heads=heads)
    torch.testing.assert_close(decomposition.components.sum(0), final, atol=1e-5, rtol=1e-5)
    partial = decompose_residual(result.cache, model, upto_layer=1, heads=heads)
    torch.testing.assert_close(partial.components.sum(0), result.cache["blocks.1.hook_resid_pre"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma2"])
def test_heads_plus_bias_are_the_attention_output(tiny, architecture):
    model, _ = tiny(architecture)
    result = mechvis.run(model, PROMPT)
    for layer in range(model.cfg.n_layers):
        bias = model.blocks[layer].attn.b_O
        total = head_results(result.cache, model, layer).sum(0) + (0 if bias is None else bias)
        torch.testing.assert_close(total, result.cache[f"blocks.{layer}.hook_attn_out"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_dla_adds_up_to_the_hf_logit_difference(tiny, architecture):
    model, reference = tiny(architecture)
    result = mechvis.run(model, PROMPT)
    attribution = direct_logit_attribution(result.cache, model, " Mary", " John")
    total = attribution.contributions.sum().item() + attribution.unembed_bias
    assert total == pytest.approx(attribution.model_value, abs=1e-5)
    hf_logits = hf_forward(reference, result.tokens.tolist()).logits[0, -1]
    mary, john = (model.hf_tokenizer.encode(t, add_special_tokens=False)[0] for t in (" Mary", " John"))
    assert attribution.model_value == pytest.approx((hf_logits[mary] - hf_logits[john]).item(), abs=1e-4)
    assert len(attribution.labels) == 1 + (architecture == "gpt2") + model.cfg.n_layers * (model.cfg.n_heads + 2)
    single = direct_logit_attribution(result.cache, model, " Mary", heads=False, position=3)
    assert single.contributions.sum().item() + single.unembed_bias == pytest.approx(result.logits[3, mary].item(), abs=1e-5)


def test_dla_bad_input(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    with pytest.raises(InvalidArgumentError, match="not one"):
        direct_logit_attribution(result.cache, model, " Maryanne-Louise")
    with pytest.raises(InvalidArgumentError, match="position"):
        direct_logit_attribution(result.cache, model, " Mary", position=500)
    with pytest.raises(InvalidArgumentError, match="layer 7"):
        head_results(result.cache, model, 7)


def test_layer_similarity_matches_numpy(tiny):
    model, reference = tiny("llama")  # RMSNorm: the residual stream equals HF's hidden states
    result = mechvis.run(model, PROMPT)
    hidden = [h[0].double().numpy() for h in hf_forward(reference, result.tokens.tolist()).hidden_states[:-1]]
    hidden.append(result.cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0].double().numpy())
    n = len(hidden)
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            cosines = [
                hidden[i][p] @ hidden[j][p] / np.linalg.norm(hidden[i][p]) / np.linalg.norm(hidden[j][p])
                for p in range(1, hidden[i].shape[0])
            ]
            expected[i, j] = np.mean(cosines)
    similarity = layer_similarity(result.cache, model)
    np.testing.assert_allclose(similarity.cosine.numpy(), expected, atol=1e-4)
    assert similarity.positions[0] == 1 and similarity.layer_labels[0] == "embed"
