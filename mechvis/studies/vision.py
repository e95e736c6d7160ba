"""Studies of a vision-language model that run it: how much the answer depends on the image
(`visual_information`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechvis.errors import InvalidArgumentError
from mechvis.images import encode_with_image, load_image, with_text_appended
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



@dataclass
class VisualInformation(Result):
    """Visual pointwise information of each continuation token, in nats:
    log p(token | image) − log p(token | blank image) (positive: the image made it likelier)."""

    tokens: list[int]
    with_image: Float[Tensor, " token"]
    with_blank: Float[Tensor, " token"]

    units = {"with_image": "nats", "with_blank": "nats"}

    @property
    def pointwise(self) -> Float[Tensor, " token"]:
        return self.with_image - self.with_blank


def visual_information(
    model: "TransformerBridge", prompt: str, image: object, continuation: str, *, chat: bool = False, blank: object | None = None
) -> VisualInformation:
    """Score `continuation` after `prompt` with the image and with a blank image (mid-grey, the
    image's size, unless `blank` is given), teacher-forced in one pass each."""


    picture = load_image(image)
    baseline = load_image(blank) if blank is not None else load_image(np.full((picture.height, picture.width, 3), 128, np.uint8))
    continuation_ids = model.hf_tokenizer.encode(continuation, add_special_tokens=False)
    if not continuation_ids:
        raise InvalidArgumentError("The continuation is empty; give the text to score.")
    scores = []
    for candidate in (picture, baseline):
        encoded, extra = encode_with_image(model, prompt, candidate, chat=chat)
        ids = torch.tensor([encoded.token_ids + continuation_ids], device=model.cfg.device)
        extra = with_text_appended(extra, len(continuation_ids))
        with torch.no_grad():
            log_probs = model(ids, **extra)[0].double().log_softmax(-1)
        start = len(encoded.token_ids)
        predicted = log_probs[start - 1 : -1].gather(-1, ids[0, start:, None])[:, 0]
        scores.append(predicted.float())
    return VisualInformation(continuation_ids, scores[0], scores[1])
