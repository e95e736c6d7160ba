"""Integrated gradients (Captum) and attention × gradient relevancy (Chefer et al. 2021): Captum on
the plain HF model, completeness, and a numpy transcription of the paper's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechvis
from mechvis.studies.gradients import attention_gradient_relevancy, integrated_gradients, pixel_integrated_gradients
from mechvis.errors import InvalidArgumentError
from tests.test_vlm import tiny_llava  # noqa: F401  (module fixture)

PROMPT = "The cat sat on the mat and then the cat"


def test_integrated_gradients_equal_captum_on_the_hf_model_and_are_complete(tiny):
    from captum.attr import IntegratedGradients

    model, reference = tiny("llama")
    tokens = mechvis.encode(model, PROMPT).token_ids
    ours = integrated_gradients(model, torch.tensor(tokens), 5, position=-2, n_steps=24)
    ids = torch.tensor([tokens])
    embeddings = reference.get_input_embeddings()(ids).detach()
    baseline = embeddings.mean(1, keepdim=True).expand_as(embeddings)  # the "mean" baseline, by hand

    def log_prob(x):
        return reference(inputs_embeds=x).logits[:, -2].double().log_softmax(-1)[:, 5]

    theirs = IntegratedGradients(log_prob).attribute(embeddings, baselines=baseline, n_steps=24, method="gausslegendre")
    np.testing.assert_allclose(ours.scores.numpy(), theirs[0].sum(-1).detach().numpy(), atol=1e-4, rtol=1e-3)
    assert ours.relative_error < 0.01  # completeness: Σ IG = f(x) − f(0) within 1 %
    assert float(ours.scores.sum()) == pytest.approx(ours.value - ours.baseline_value, rel=0.01)
    assert ours.scores[-1].item() == 0.0  # the last token is after position −2: causal mask
    zero = integrated_gradients(model, torch.tensor(tokens), 5, position=-2, n_steps=24, baseline="zero")
    assert zero.relative_error > 0.05  # why the default is not zero: RMSNorm's jump near 0


def test_relevancy_equals_a_numpy_transcription_of_the_rule(tiny):
    model, reference = tiny("llama")
    tokens = mechvis.encode(model, PROMPT).token_ids
    ours = attention_gradient_relevancy(model, torch.tensor(tokens), 7, position=-1)
    output = reference(torch.tensor([tokens]), output_attentions=True)
    value = output.logits[0, -1].double().log_softmax(-1)[7]
    gradients = torch.autograd.grad(value, output.attentions)
    n = len(tokens)
    relevance = np.eye(n)
    for attention, gradient in zip(output.attentions, gradients):  # Chefer et al. 2021, eq. 5–6
        a, g = attention[0].detach().double().numpy(), gradient[0].double().numpy()
        a_bar = np.maximum(g * a, 0).mean(0)
        relevance = relevance + a_bar @ relevance
    np.testing.assert_allclose(ours.matrix.numpy(), relevance, atol=1e-5)
    np.testing.assert_allclose(ours.scores.numpy(), relevance[-1], atol=1e-5)


def test_gradient_inputs_are_checked(tiny):
    model, _ = tiny("llama")
    tokens = torch.tensor(mechvis.encode(model, PROMPT).token_ids)
    for steps in (0, -3):
        with pytest.raises(InvalidArgumentError, match="n_steps"):
            integrated_gradients(model, tokens, 5, n_steps=steps)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        attention_gradient_relevancy(model, tokens, 5, position=99)
    with pytest.raises(InvalidArgumentError, match="baseline"):
        integrated_gradients(model, tokens, 5, n_steps=2, baseline=torch.zeros(3, 3))


def test_gradients_on_a_vlm_map_onto_the_grid(tiny_llava):  # noqa: F811
    from mechvis.images import encode_with_image
    from tests.test_vlm_study import square_image

    bridge, _, _ = tiny_llava
    picture = square_image()
    encoded, extra = encode_with_image(bridge, "What is bright?", picture)
    grid = encoded.segments.image_grid
    tokens = torch.tensor(encoded.token_ids)
    ig = integrated_gradients(bridge, tokens, 11, n_steps=24, extra=extra)
    assert ig.on_grid(grid).shape == (4, 4) and ig.relative_error < 0.01
    relevancy = attention_gradient_relevancy(bridge, tokens, 11, extra=extra)
    assert relevancy.on_grid(grid).shape == (4, 4) and bool((relevancy.scores >= 0).all())
    pixels = pixel_integrated_gradients(bridge, "What is bright?", picture, 11, n_steps=24)
    assert pixels.saliency.shape == (32, 32) and pixels.relative_error < 0.01
