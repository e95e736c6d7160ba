"""A recorder's logits step is checked like any logits processor: a clear error, never a deep
traceback or silently garbled sampling."""

from __future__ import annotations

import pytest
import torch

import mechvis
from mechvis.errors import InvalidArgumentError
from mechvis.generation import Recorder, SamplingSettings


class _Returns(Recorder):
    def __init__(self, make):
        self.make = make

    def logits_step(self, input_ids, scores):
        return self.make(scores)


@pytest.mark.parametrize(("make", "message"), [
    (lambda scores: None, r"returned None; a processor f\(input_ids, scores\) must return the scores"),
    (lambda scores: scores[:, :10], r"returned a tensor of shape \(1, 10\)"),
    (lambda scores: scores * float("nan"), "returned NaN scores"),
], ids=["none", "shape", "nan"])
def test_a_bad_logits_step_is_named(tiny_llama, make, message):
    with pytest.raises(InvalidArgumentError, match=message):
        mechvis.generate(tiny_llama, "Hello there", max_new_tokens=2, recorders=[_Returns(make)], analysis_pass=False)


def test_minus_infinity_masks_a_token(tiny_llama):
    """−inf is how a step removes a token: allowed, and the masked token is never drawn."""

    def mask_first_choice(scores):
        masked = scores.clone()
        masked[:, scores.argmax(-1)] = float("-inf")
        return masked

    plain = mechvis.generate(tiny_llama, "Hello there", max_new_tokens=3, analysis_pass=False)
    masked = mechvis.generate(tiny_llama, "Hello there", max_new_tokens=3, recorders=[_Returns(mask_first_choice)],
                              sampling=SamplingSettings(temperature=0.0), analysis_pass=False)
    assert masked.generated_ids[0] != plain.generated_ids[0]
    assert torch.isfinite(masked.step_logits).all()
