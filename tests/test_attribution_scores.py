"""What attribution scores: the model's own logit (equal to HF's), the log-probability, or the
centred logit — each checked against Captum (InputXGradient, Occlusion) over `inputs_embeds` of
the plain HF model with eager attention in float32, built from the same tiny config and weights.

The tiny models get a shared direction added to every row of the output embedding, so the mean
logit over the vocabulary is large (tens of logits) and a centred logit differs visibly from the
logit, as on trained models (the embedded model: 19.23 centred vs 17.37 for " Paris")."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, Occlusion

import mechvis
from mechvis.studies.attribution import gradient_x_input, occlusion
from mechvis.analysis import high_entropy_positions
from mechvis.errors import InvalidArgumentError
from tests.tiny import tiny_hf_model

PROMPT = "The cat chased the mouse around the house until it"
POSITION = 6
SCORES = ("logit", "logprob", "centered_logit")


def _shifted(architecture: str):
    """A tiny HF model whose logits share a large mean, and non-trivial final-norm gains."""
    model = tiny_hf_model(architecture)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight += torch.randn(head.weight.shape[1], generator=generator) * 0.5
        if getattr(head, "bias", None) is not None:
            head.bias += 3.0
        final_norm = getattr(model.base_model, "norm", None) or model.base_model.ln_f
        for parameter in final_norm.parameters():
            parameter += torch.randn(parameter.shape, generator=generator) * 0.3
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "gemma2"])
def shifted(request, tokenizer):
    """(bridge, untouched HF reference, token ids) for one architecture."""
    hf_model = _shifted(request.param)
    reference = copy.deepcopy(hf_model)
    bridge = mechvis.load_model(hf_model, tokenizer=tokenizer, device="cpu")
    return bridge, reference, torch.tensor(mechvis.encode(bridge, PROMPT).token_ids)


def _hf_score(reference, target: int, score: str, position: int = POSITION):
    """score(inputs_embeds) on the plain HF model, one value per batch row."""

    def forward(inputs_embeds):
        logits = reference(inputs_embeds=inputs_embeds).logits[:, position].double()
        if score == "logit":
            return logits[:, target]
        if score == "logprob":
            return logits.log_softmax(-1)[:, target]
        return logits[:, target] - logits.mean(-1)

    return forward


@pytest.mark.parametrize("score", SCORES)
def test_gradient_x_input_matches_captum_on_hf(shifted, score):
    bridge, reference, tokens = shifted
    got = gradient_x_input(bridge, tokens, " the", position=POSITION, score=score)
    assert got.score == score
    embeddings = reference.get_input_embeddings()(tokens[None]).detach()
    forward = _hf_score(reference, got.target_id, score)
    expected = InputXGradient(forward).attribute(embeddings.clone().requires_grad_(True)).sum(-1)[0]
    np.testing.assert_allclose(got.scores.numpy(), expected.detach().numpy(), atol=2e-4, rtol=1e-3)
    with torch.no_grad():
        assert got.target_value == pytest.approx(forward(embeddings).item(), abs=1e-4)


@pytest.mark.parametrize("score", SCORES)
def test_occlusion_matches_captum_on_hf(shifted, score):
    bridge, reference, tokens = shifted
    got = occlusion(bridge, tokens, " the", position=POSITION, batch_size=4, score=score)
    assert got.score == score
    embeddings = reference.get_input_embeddings()(tokens[None]).detach()
    forward = _hf_score(reference, got.target_id, score)
    d_model = embeddings.shape[-1]
    with torch.no_grad():  # one token's whole embedding per window, replaced by zeros
        expected = Occlusion(forward).attribute(embeddings, sliding_window_shapes=(1, d_model), strides=(1, d_model),
                                                baselines=0.0)[0, :, 0]
        assert got.target_value == pytest.approx(forward(embeddings).item(), abs=1e-4)
    np.testing.assert_allclose(got.scores.numpy(), expected.numpy(), atol=2e-4)
    assert (got.scores[POSITION + 1 :] == 0).all()


def test_scores_differ_and_logit_is_hf(shifted):
    """The three scores are different quantities here (the mean logit moves with the input)."""
    bridge, reference, tokens = shifted
    values = {score: occlusion(bridge, tokens, " the", position=POSITION, score=score) for score in SCORES}
    with torch.no_grad():
        hf_logits = reference(tokens[None]).logits[0, POSITION]
    target = values["logit"].target_id
    assert values["logit"].target_value == pytest.approx(hf_logits[target].item(), abs=1e-4)
    assert values["centered_logit"].target_value == pytest.approx((hf_logits[target] - hf_logits.mean()).item(), abs=1e-4)
    if bridge.cfg.output_logits_soft_cap and bridge.cfg.output_logits_soft_cap > 0:
        return  # soft-capped (Gemma 2): transformer-lens leaves the unembedding uncentred
    assert abs(values["logit"].target_value - values["centered_logit"].target_value) > 1.0
    assert not torch.allclose(values["logit"].scores, values["centered_logit"].scores, atol=1e-2)


def test_high_entropy_positions_report_hf_logits(shifted):
    bridge, reference, tokens = shifted
    run = mechvis.run(bridge, PROMPT)
    with torch.no_grad():
        hf_logits = reference(tokens[None]).logits[0]
    high = high_entropy_positions(bridge, run.logits, n=4, k=3, cache=run.cache)
    assert high.logit_kind == "logit"
    expected = hf_logits[high.positions].gather(-1, high.top_ids)
    np.testing.assert_allclose(high.top_logits.numpy(), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(high.top_log_probs.numpy(), hf_logits[high.positions].log_softmax(-1).gather(-1, high.top_ids).numpy(), atol=1e-4)
    centred = high_entropy_positions(bridge, run.logits, n=4, k=3)
    assert centred.logit_kind == "centered_logit"
    np.testing.assert_allclose(centred.top_logits.numpy(), (expected - hf_logits[high.positions].mean(-1, keepdim=True)).numpy(), atol=1e-4)


def test_bad_score_and_foreign_bridge(shifted):
    bridge, _, tokens = shifted
    with pytest.raises(InvalidArgumentError, match="score must be one of"):
        occlusion(bridge, tokens, " the", score="probability")
    foreign = copy.copy(bridge)
    object.__setattr__(foreign, "mechvis_unembedding_mean", None)
    with pytest.raises(InvalidArgumentError, match="not loaded by mechvis.load_model"):
        gradient_x_input(foreign, tokens, " the", score="logit")
    assert gradient_x_input(foreign, tokens, " the", score="logprob").score == "logprob"


@pytest.mark.integration
def test_paris_logit_equals_hf_on_the_embedded_model(embedded, embedded_reference):
    """The reported case: " Paris" after "The capital of France is" — HF's logit 17.37, the
    centred one 19.23; attribution now scores the logit by default."""
    tokens = torch.tensor(mechvis.encode(embedded, "The capital of France is").token_ids)
    with torch.no_grad():
        hf_logits = embedded_reference(tokens[None]).logits[0, -1]
    paris = embedded.hf_tokenizer.encode(" Paris", add_special_tokens=False)[0]
    attribution = occlusion(embedded, tokens, " Paris")
    assert attribution.score == "logit"
    assert attribution.target_value == pytest.approx(hf_logits[paris].item(), abs=1e-3)
    assert attribution.target_value == pytest.approx(17.37, abs=0.01)
    centred = gradient_x_input(embedded, tokens, " Paris", score="centered_logit")
    assert centred.target_value == pytest.approx((hf_logits[paris] - hf_logits.mean()).item(), abs=1e-3)
    embeddings = embedded_reference.get_input_embeddings()(tokens[None]).detach()
    forward = _hf_score(embedded_reference, paris, "logit", position=len(tokens) - 1)
    with torch.no_grad():
        expected = Occlusion(forward).attribute(embeddings, sliding_window_shapes=(1, embeddings.shape[-1]),
                                                strides=(1, embeddings.shape[-1]), baselines=0.0)[0, :, 0]
    np.testing.assert_allclose(attribution.scores.numpy(), expected.numpy(), atol=2e-3)
    assert attribution.scores.argsort().tolist() == expected.argsort().tolist()  # same ranks as Captum on HF
