"""Input attribution (finite differences, causality, HF reference) and PCA (numpy SVD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechvis
from mechvis.analysis import embedding_projection, hidden_state_projection, pca
from mechvis.studies.attribution import gradient_x_input, occlusion
from mechvis.errors import InvalidArgumentError
from tests.tiny import tiny_hf_model

PROMPT = "The cat chased the mouse around the house until it"


def test_gradient_x_input_matches_finite_differences(tokenizer):
    # GPT-2 in float64: its LayerNorm stays in float64 (HF's Llama RMSNorm casts to float32,
    # which would drown a small finite-difference step in rounding).
    model = mechvis.load_model(tiny_hf_model("gpt2"), tokenizer=tokenizer, device="cpu", dtype=torch.float64)
    tokens = torch.tensor(mechvis.encode(model, PROMPT).token_ids)
    attribution = gradient_x_input(model, tokens, " the", position=-2, score="centered_logit")  # the bridge's own logits
    target = attribution.target_id
    epsilon = 1e-5
    for position in (0, 3, len(tokens) - 2):
        values = []
        for sign in (1, -1):
            def scale(embedding, hook, position=position, sign=sign):
                embedding = embedding.clone()
                embedding[:, position] *= 1 + sign * epsilon
                return embedding

            with torch.no_grad():
                logits = model.run_with_hooks(tokens[None], fwd_hooks=[("hook_embed", scale)])
            values.append(logits[0, -2, target].item())
        # d/dε f(e + ε e_t) at ε = 0 is ∇_t f · e_t: exactly gradient × input at t.
        assert attribution.scores[position].item() == pytest.approx((values[0] - values[1]) / (2 * epsilon), rel=1e-6, abs=1e-10)
    assert (attribution.scores[-1:] == 0).all()  # after the target position
    assert all(parameter.grad is None for parameter in model.parameters())


def test_gradient_x_input_matches_hf_autograd(tiny):
    model, reference = tiny("llama")
    tokens = torch.tensor(mechvis.encode(model, PROMPT).token_ids)
    attribution = gradient_x_input(model, tokens, " the", position=-2, score="centered_logit")
    embeddings = reference.get_input_embeddings()(tokens[None]).detach().requires_grad_(True)
    logits = reference(inputs_embeds=embeddings).logits[0, -2]
    centred = logits[attribution.target_id] - logits.mean()  # compatibility mode centres the unembedding
    (gradient,) = torch.autograd.grad(centred, embeddings)
    expected = (gradient[0] * embeddings[0]).sum(-1).detach()
    torch.testing.assert_close(attribution.scores, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_occlusion_matches_hf_with_zeroed_embeddings(tiny, architecture):
    model, reference = tiny(architecture)
    tokens = torch.tensor(mechvis.encode(model, PROMPT).token_ids)
    position = 6
    result = occlusion(model, tokens, " the", position=position, batch_size=4, score="centered_logit")
    assert (result.scores[position + 1 :] == 0).all()  # tokens after the target cannot matter
    target = result.target_id
    embeddings = reference.get_input_embeddings()(tokens[None]).detach()

    def centred_target_logit(inputs_embeds):
        with torch.no_grad():
            logits = reference(inputs_embeds=inputs_embeds).logits[0, position]
        return (logits[target] - logits.mean()).item()  # compatibility mode centres the unembedding

    clean = centred_target_logit(embeddings)
    for occluded in range(position + 1):
        zeroed = embeddings.clone()
        zeroed[0, occluded] = 0
        assert result.scores[occluded].item() == pytest.approx(clean - centred_target_logit(zeroed), abs=1e-4)


def test_attribution_bad_input(tiny):
    model, _ = tiny("llama")
    tokens = torch.tensor([5, 6, 7])
    with pytest.raises(InvalidArgumentError, match="not one"):
        occlusion(model, tokens, " internationalisation")
    with pytest.raises(InvalidArgumentError, match="position"):
        gradient_x_input(model, tokens, 5, position=3)
    with pytest.raises(InvalidArgumentError, match="one non-empty sequence"):
        occlusion(model, tokens[None], 5)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        occlusion(model, tokens, 5, batch_size=0)


def _numpy_pca(data: np.ndarray, k: int):
    centred = data - data.mean(0)
    covariance = centred.T @ centred
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    components = eigenvectors[:, :k].T
    for row in components:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    return centred @ components.T, eigenvalues[:k] / eigenvalues.sum()


def test_pca_matches_numpy_eigendecomposition():
    data = np.random.default_rng(0).normal(size=(40, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    projection = pca(torch.from_numpy(data), [str(i) for i in range(40)], n_components=3)
    coordinates, ratio = _numpy_pca(data, 3)
    np.testing.assert_allclose(projection.coordinates.numpy(), coordinates, atol=1e-4)
    np.testing.assert_allclose(projection.explained_variance_ratio.numpy(), ratio, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="n_components"):
        pca(torch.from_numpy(data), [str(i) for i in range(40)], n_components=7)


def test_hidden_state_and_embedding_projections(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, PROMPT)
    projection = hidden_state_projection(result.cache, model, result.str_tokens, layer=1, positions=[1, 2, 3, 4])
    assert projection.labels == result.str_tokens[1:5] and projection.coordinates.shape == (4, 2)
    words = embedding_projection(model, [" Monday", " Tuesday", " cat", " dog"], n_components=3)
    assert words.labels == [" Monday", " Tuesday", " cat", " dog"] and words.coordinates.shape == (4, 3)
    with pytest.raises(InvalidArgumentError, match="labels"):
        hidden_state_projection(result.cache, model, ["a"], layer=1)
