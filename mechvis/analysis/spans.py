"""Finding token spans in a run: by spelling (`find_token_spans`) or by meaning
(`semantic_token_spans`, cosine to a keyword's embedding)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechvis._deprecation import deprecated
from mechvis._validation import (
    activation,
    cache_and_model,
    check_bool,
    check_layers,
    check_model,
    check_real,
    shown,
)
from mechvis.errors import InvalidArgumentError
from mechvis.results import Result
from mechvis.running import Run
from mechvis.types import Span

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

def find_token_spans(
    run: "Run", keyword: str, *, case_sensitive: bool = False, whole_word: bool = True,
    match: str = "spelling", model: "TransformerBridge | None" = None, layer: int | None = None, threshold: float = 0.5,
) -> list[Span]:
    """Every occurrence of `keyword` in the run's text as a token span (kind "keyword").

    Matching uses character offsets, so a word split into several tokens, or sharing a token
    with a neighbouring space, is found; each occurrence gives one span.
    `match="semantic"` finds positions by meaning instead (the model is the run's cache's own; `layer`, `threshold`:
    see mechvis.analysis.spans.semantic_token_spans, which also returns every score).

    Raises:
        InvalidArgumentError: a keyword that is not a non-empty string, a bad `match`, flags that
            are not bools.
    """
    if not isinstance(keyword, str):
        raise InvalidArgumentError(f"keyword must be a string (the text to find); got {shown(keyword)}.")
    case_sensitive, whole_word = check_bool(case_sensitive, "case_sensitive"), check_bool(whole_word, "whole_word")
    if match == "semantic":
        if model is not None:
            deprecated("find_token_spans(..., model=...) is deprecated: the model is the run's cache's own "
                       "(find_token_spans(run, keyword, match=\"semantic\", layer=..., threshold=...)).", stacklevel=3)
            model = check_model(model)
        else:
            _, model = cache_and_model(run, call='find_token_spans(run, keyword, *, match="semantic", layer=None, threshold=0.5)')
        return _semantic_token_spans(run, keyword, model, layer=layer, threshold=threshold).spans
    if match != "spelling":
        raise InvalidArgumentError(f"match must be 'spelling' or 'semantic'; got {match!r}.")
    if not keyword.strip():
        raise InvalidArgumentError("The keyword is empty.")
    pattern = re.escape(keyword)
    if whole_word:
        pattern = rf"(?<!\w){pattern}(?!\w)"
    spans = []
    for match in re.finditer(pattern, run.text, flags=0 if case_sensitive else re.IGNORECASE):
        covered = [
            index for index, (start, stop) in enumerate(run.offsets)
            if start < match.end() and stop > match.start()
        ]
        if covered:
            spans.append(Span("keyword", covered[0], covered[-1] + 1))
    return spans


@dataclass
class SemanticMatch(Result):
    """Cosine similarity of every position to the keyword (`scores`, NaN for positions not
    compared: the first one, a BOS/attention sink) and the spans scoring ≥ threshold."""

    units = {'scores': 'cosine similarity', 'threshold': 'cosine similarity'}

    keyword: str
    layer: int | None
    threshold: float
    scores: Float[Tensor, " pos"]
    spans: list[Span]


def _keyword_vector(model: "TransformerBridge", keyword: str, layer: int | None) -> Tensor:
    ids = model.hf_tokenizer.encode(keyword, add_special_tokens=False)
    if not ids:
        raise InvalidArgumentError("The keyword is empty.")
    if layer is None:
        return model.original_model.get_input_embeddings().weight[ids].detach().double().mean(0).cpu()
    prefix = [model.hf_tokenizer.bos_token_id] if model.hf_tokenizer.bos_token_id is not None else []
    kept: dict[str, Tensor] = {}

    def keep(residual: Tensor, hook) -> None:
        kept["x"] = residual[0, len(prefix) :].detach().double().cpu()

    with torch.no_grad():
        model.run_with_hooks(torch.tensor([prefix + ids], device=model.cfg.device), fwd_hooks=[(f"blocks.{layer}.hook_resid_post", keep)])
    return kept["x"].mean(0)


def semantic_token_spans(run: "Run", keyword: str, *old: object, layer: int | None = None, threshold: float = 0.5,
                         model: "TransformerBridge | None" = None) -> SemanticMatch:
    """Positions of `run` whose representation is closest in meaning to `keyword` (module
    docstring). `layer` None compares input embeddings; a layer compares residual streams (the run's
    cache must hold blocks.{layer}.hook_resid_post). The model is the run's cache's own; the old
    form `semantic_token_spans(run, keyword, model, ...)` (or `model=`) still works, with a
    `MechvisDeprecationWarning`."""
    if len(old) > 1:
        raise TypeError("semantic_token_spans takes its options by keyword: semantic_token_spans(run, keyword, *, layer=None, threshold=0.5).")
    if old:
        model = old[0]
        if model is None:
            raise InvalidArgumentError("model must be a model loaded with mechvis.load_model(...); got None.")
    if model is not None:
        deprecated("Passing the model is deprecated: call semantic_token_spans(run, keyword, *, layer=None, threshold=0.5) "
                   "(the model is the run's cache's own).", stacklevel=3)
        model = check_model(model)
    else:
        _, model = cache_and_model(run, call="semantic_token_spans(run, keyword, *, layer=None, threshold=0.5)")
    return _semantic_token_spans(run, keyword, model, layer=layer, threshold=threshold)


def _semantic_token_spans(run: "Run", keyword: str, model: "TransformerBridge", *, layer: int | None, threshold: float) -> SemanticMatch:
    threshold = check_real(threshold, "threshold", low=-1.0, high=1.0, hint=" (a cosine similarity)")
    if not isinstance(keyword, str):
        raise InvalidArgumentError(f"keyword must be a string (the text to find); got {shown(keyword)}.")
    if not keyword.strip():
        raise InvalidArgumentError("The keyword is empty.")
    if layer is not None:
        (layer,) = check_layers(model, [layer])
        states = activation(run.cache, f"blocks.{layer}.hook_resid_post").detach().double().cpu()
    else:
        states = model.original_model.get_input_embeddings().weight[run.tokens.to(model.original_model.device)].detach().double().cpu()
    target = _keyword_vector(model, keyword, layer)
    scores = torch.nn.functional.cosine_similarity(states, target[None], dim=-1)
    scores[0] = float("nan")
    above = (scores >= threshold).tolist()
    spans, start = [], None
    for position, hit in enumerate(above + [False]):
        if hit and start is None:
            start = position
        elif not hit and start is not None:
            spans.append(Span("keyword", start, position))
            start = None
    return SemanticMatch(keyword, layer, threshold, scores.float(), spans)
