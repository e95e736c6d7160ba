"""Interactive views (circuitsvis components) as data: a component name and its props.

A report inlines circuitsvis' JavaScript bundle once and renders every view from it
(`mechvis.report`); in a notebook a view displays itself offline (`_repr_html_` inlines the bundle).
Views never compute metrics: they take analysis results and round values for size.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Literal

import torch

from mechvis.analysis.lens import decode_nested
from mechvis.analysis.tokens import TokenSignals
from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace
    from mechvis.running import Run


@dataclass(frozen=True)
class View:
    """A circuitsvis component (`CircuitsVis.<component>`) with its props and a title."""

    component: str
    props: dict
    title: str

    def props_json(self) -> str:
        """The props as JSON that is safe inside an HTML <script> element (token strings are user
        data: `<`, `>` and `&` are escaped as JSON unicode escapes; NaN becomes null)."""
        text = json.dumps(json_safe(self.props), separators=(",", ":"), ensure_ascii=False)
        for character, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            text = text.replace(character, escape)
        return text

    def render_call(self, element_id: str) -> str:
        """HTML for this view: a container and the script that renders into it (the bundle must
        already be loaded)."""
        return (
            f'<div class="circuitsvis-view" id="{html.escape(element_id)}"></div>\n'
            f"<script>CircuitsVis.render({json.dumps(element_id)}, CircuitsVis.{self.component}, {self.props_json()});</script>"
        )

    def _repr_html_(self) -> str:
        return f"<script>{circuitsvis_bundle()}</script>\n{self.render_call('cv-' + uuid.uuid4().hex[:12])}"


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis' browser bundle (defines the global `CircuitsVis`), safe inside <script>: its
    one `</script` is inside a string literal, where `<\\/script` is the same string."""
    source = resources.files("circuitsvis").joinpath("dist/cdn/iife.js").read_text(encoding="utf-8")
    return source.replace("</script", "<\\/script")


def rounded(tensor: torch.Tensor, decimals: int = 4) -> list:
    """`tensor` as nested lists of floats rounded to `decimals` (compact in JSON)."""
    # float64: a float32 value rounded to 3 decimals prints as 0.12300000339746475.
    return torch.round(tensor.double(), decimals=decimals).tolist()


def attention_heads_view(run: "Run", layer: int, *, decimals: int = 3) -> View:
    """Every head's attention pattern at `layer` (AttentionHeads), values rounded to `decimals`."""
    name = f"blocks.{layer}.attn.hook_pattern"
    if name not in run.cache:
        raise InvalidArgumentError(f"The run's cache has no attention pattern for layer {layer}.")
    pattern = run.cache[name][0]
    return View(
        "AttentionHeads",
        {
            "attention": rounded(pattern, decimals),
            "tokens": run.str_tokens,
            "attentionHeadNames": [f"L{layer}H{head}" for head in range(pattern.shape[0])],
            "maskUpperTri": True,
        },
        f"Attention heads of layer {layer}",
    )


def _lower_triangle(rows: list[list[float]]) -> list[list[float]]:
    return [row[: query + 1] for query, row in enumerate(rows)]


def attention_layer_view(run: "Run", layer: int, *, decimals: int = 3) -> View:
    """One layer's attention as a light AttentionHeads view: it draws the mean over heads (two
    charts: the selector thumbnail and the zoomed pattern, where `attention_heads_view` draws one
    per head plus the zoomed one); every head's pattern rides along in the props (`heads`, which
    circuitsvis ignores) so a page can swap the shown pattern (the report's head selector).

    Rows are sent as the causal lower triangle only (query q holds keys 0 … q): circuitsvis makes
    one chart element per value, so this halves the drawing work and the size; the masked upper
    triangle is left blank instead of grey. Causal models only (the report's models are)."""
    name = f"blocks.{layer}.attn.hook_pattern"
    if name not in run.cache:
        raise InvalidArgumentError(f"The run's cache has no attention pattern for layer {layer}.")
    pattern = run.cache[name][0].float()
    return View(
        "AttentionHeads",
        {
            "attention": [_lower_triangle(rounded(pattern.mean(0), decimals))],
            "attentionHeadNames": [f"L{layer} mean of heads"],
            "tokens": run.str_tokens,
            "maskUpperTri": True,
            "heads": [_lower_triangle(head) for head in rounded(pattern, decimals)],
            "headNames": [f"L{layer}H{head}" for head in range(pattern.shape[0])],
        },
        f"Attention of layer {layer}",
    )


ColourMode = Literal["entropy", "probability", "logit_gap", "not_argmax"]
COLOUR_MODES: tuple[str, ...] = ("entropy", "probability", "logit_gap", "not_argmax")


def token_colour_values(trace: "Trace", signals: TokenSignals, mode: ColourMode) -> list[float]:
    """One value per token of the trace's run (0 where undefined, e.g. the first token):

    - "entropy": entropy (nats) of the distribution that produced the token;
    - "probability": the token's probability under that distribution (temperature 1);
    - "logit_gap": top-1 minus top-2 probability of that distribution;
    - "not_argmax": 1 where a generated token was sampled although it was not the argmax.
    """
    n = len(trace.run.tokens)
    values = torch.zeros(n)
    if mode == "entropy":
        values[1:] = signals.entropy[:-1]
    elif mode == "probability":
        values[1:] = (-signals.surprisal[:-1]).exp()
    elif mode == "logit_gap":
        values[1:] = signals.margin[:-1]
    elif mode == "not_argmax":
        values[trace.prompt_length : trace.prompt_length + len(trace.generated_ids)] = trace.sampled_not_argmax.float()
    else:
        raise InvalidArgumentError(f"mode must be one of {COLOUR_MODES}; got {mode!r}.")
    return rounded(values, 3)


def colored_tokens_view(trace: "Trace", signals: TokenSignals, mode: ColourMode) -> View:
    """Tokens coloured by `mode` (ColoredTokens); see token_colour_values."""
    values = token_colour_values(trace, signals, mode)
    return View(
        "ColoredTokens",
        {"tokens": trace.run.str_tokens, "values": values, "minValue": 0.0, "maxValue": max(max(values), 1e-6)},
        f"Tokens coloured by {mode.replace('_', ' ')}",
    )


def topk_tokens_view(model: "TransformerBridge", run: "Run", *, k: int = 10) -> View:
    """For each position, the model's top-k next tokens and where the actual next token ranked
    (TokenLogProbs)."""
    log_probs = run.logits[:-1].float().log_softmax(-1)
    top_log_probs, top_ids = log_probs.topk(k, dim=-1)
    actual = run.tokens[1:].to(log_probs.device)
    actual_log_probs = log_probs.gather(-1, actual[:, None])[:, 0]
    ranks = (log_probs > actual_log_probs[:, None]).sum(-1)
    return _topk_view(model, run, top_log_probs, top_ids, actual_log_probs, ranks)


def topk_tokens_view_from_signals(model: "TransformerBridge", run: "Run", signals: "TokenSignals", next_ranks: torch.Tensor) -> View:
    """`topk_tokens_view` from token signals (their k) and each next token's rank, for a run that
    keeps no (pos, vocab) logits (the long-context path: `LongContextAnalysis.signals` and
    `.next_ranks`). The same numbers: log of the top-k probabilities, −surprisal."""
    return _topk_view(model, run, signals.top_probs[:-1].log(), signals.top_ids[:-1], -signals.surprisal[:-1], next_ranks[:-1])


def _topk_view(model: "TransformerBridge", run: "Run", top_log_probs: torch.Tensor, top_ids: torch.Tensor, actual_log_probs: torch.Tensor, ranks: torch.Tensor) -> View:
    return View(
        "TokenLogProbs",
        {
            "prompt": run.str_tokens,
            "topKLogProbs": rounded(top_log_probs, 3),
            "topKTokens": decode_nested(model, top_ids),
            "correctTokenRank": ranks.tolist(),
            "correctTokenLogProb": rounded(actual_log_probs, 3),
        },
        f"Top-{top_ids.shape[-1]} next tokens at each position",
    )
