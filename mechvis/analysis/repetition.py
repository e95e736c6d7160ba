"""Repetition / collapse monitoring for generated text.

Every signal of generated token p is computed from the state at position q = p − 1, the one whose
logits produced token p (as `generate(output_scores=True)` sees it). No signal uses token p itself
or anything after it, so a signal at p is a prediction of whether token p continues a loop.

- Labels from text: `rep_labels` (token p completes a 4-gram already seen within the last 200
  generated tokens), `seq_rep_n` (Welleck et al. 2019), `distinct_n`.
- `seed_score`: the seed's S = H/log V + α·R + β·U + δ·F, kept exactly for reproducibility (see
  REFERENCES: U is dead for trained models and R uses future tokens through min-max scaling).
- `repetition_features`: the sound, causal signals; `RepetitionMonitor` combines them with a
  logistic model whose fitted weights ship with the package. `StreamingFeatures` computes the
  same signals while decoding, before each token is sampled (for `MonitorTemperature`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis._deprecation import moved_names
from mechvis._numerics import row_entropy
from mechvis._validation import activation, trace_form
from mechvis.errors import InvalidArgumentError
from mechvis.generation.monitor import InductionHeads, RepetitionFeatures, cusum_alarm, feature_layer, feature_values
from mechvis.generation.trace import Trace
from mechvis.models.architecture import pattern_hook, visible_keys
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace


def loop_onset(labels: Int[Tensor, " pos"], *, min_run: int = 4) -> int | None:
    """First position of the first run of at least `min_run` consecutive repeat labels (the loop
    becoming visible in the text), or None."""
    run = 0
    for position, label in enumerate(labels.tolist()):
        run = run + 1 if label else 0
        if run >= min_run:
            return position - min_run + 1
    return None


def seq_rep_n(token_ids: Sequence[int], n: int = 4) -> float:
    """1 − |unique n-grams| / |n-grams| (Welleck et al. 2019); 0 for sequences shorter than n."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(token_ids: Sequence[int], n: int = 2) -> float:
    """|unique n-grams| / |n-grams|; 0 for sequences shorter than n."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class SeedScore(Result):
    """The seed's collapse score and its terms, per generated token (positions `positions`)."""

    units = {'entropy_term': 'fraction (of log V)', 'activation_rise': 'fraction (min-max scaled)', 'uniformity': 'fraction', 'attention_focus': 'fraction', 'score': 'fraction'}

    positions: list[int]
    entropy_term: Float[Tensor, " gen"]  # H_t / log V
    activation_rise: Float[Tensor, " gen"]  # R_t, min-max over the generated tokens
    uniformity: Float[Tensor, " gen"]  # U_t = clip(1 − KL(p ‖ uniform), 0, 1)
    attention_focus: Float[Tensor, " gen"]  # F_t = 1 − H(attention row) / log n
    score: Float[Tensor, " gen"]


@trace_form("seed_score(trace, *, alpha=1.0, beta=1.0, delta=1.0)")
def seed_score(
    model: "TransformerBridge", trace: "Trace", *, alpha: float = 1.0, beta: float = 1.0, delta: float = 1.0
) -> SeedScore:
    """S_t = H_t/log V + α·R_t + β·U_t + δ·F_t, exactly as the seed defines it.

    H_t: entropy (nats) of the temperature-1 distribution that produced token t; V: vocabulary size.
    R_t: ‖h_t‖ − ‖h_{t−1}‖ at the last layer's residual output, min-max normalised over the
    generated tokens (uses future tokens; always yields one 0 and one 1).
    U_t: clip(1 − KL(p‖uniform), 0, 1) with KL(p‖u) = log V − H_t.
    F_t: 1 − H(a_t)/log n_t for the last layer's head-averaged attention row a_t over its n_t keys
    (the keys its mask lets it see: t + 1, or fewer in a sliding window or chunk; `visible_keys`).
    """
    run = trace.run
    states = [p - 1 for p in trace.generated_positions]
    if not states:
        raise InvalidArgumentError("The trace generated no tokens; there is nothing to score.")
    vocab = run.logits.shape[-1]
    log_probs = run.logits[states].double().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    last = model.cfg.n_layers - 1
    norms = activation(run.cache, f"blocks.{last}.hook_resid_post").double().norm(dim=-1)
    rise = norms[states] - norms[[q - 1 for q in states]]
    spread = rise.max() - rise.min()
    rise = (rise - rise.min()) / spread if spread > 0 else torch.zeros_like(rise)
    uniformity = (1.0 - (math.log(vocab) - entropy)).clamp(0.0, 1.0)
    mean_rows = activation(run.cache, pattern_hook(last)).double().mean(0)[states]
    n_keys = visible_keys(model, [last], run.tokens.shape[0])[0][states].double()  # i + 1, or the window
    focus = 1.0 - row_entropy(mean_rows) / torch.log(n_keys)
    entropy_term = entropy / math.log(vocab)
    score = entropy_term + alpha * rise + beta * uniformity + delta * focus
    return SeedScore(list(trace.generated_positions), *(t.float() for t in (entropy_term, rise, uniformity, focus, score)))


@trace_form("repetition_features(trace, *, induction, layer=None, recurrence_window=64)", options=("induction",))
def repetition_features(
    model: "TransformerBridge",
    trace: "Trace",
    induction: InductionHeads,
    *,
    layer: int | None = None,
    recurrence_window: int = 64,
) -> RepetitionFeatures:
    """The causal signals of every generated token of `trace` (see FEATURES).

    Args:
        induction: heads for copy attention (find_induction_heads, once per model).
        layer: residual stream for activation_z and recurrence (default: two thirds of the depth).
        recurrence_window: how many earlier tokens recurrence compares with.
    """
    run = trace.run
    states = [p - 1 for p in trace.generated_positions]
    if not states:
        raise InvalidArgumentError("The trace generated no tokens; there is nothing to score.")
    layer = feature_layer(model, layer)
    index = torch.tensor(states)
    values = feature_values(
        run.logits[index],
        activation(run.cache, f"blocks.{layer}.hook_resid_post"),
        run.tokens.cpu(),
        lambda l: activation(run.cache, pattern_hook(l))[:, index],
        states,
        induction=induction,
        n_layers=model.cfg.n_layers,
        sinks=run.segments.sink_positions,
        prompt_length=trace.prompt_length,
        recurrence_window=recurrence_window,
    )
    return RepetitionFeatures(list(trace.generated_positions), values)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (sklearn.metrics.roc_auc_score; ties count half, as Mann–Whitney
    U); NaN without both classes."""
    from sklearn.metrics import roc_auc_score  # scikit-learn takes ~1.5 s to import: loaded when used

    labels_list = [int(label) for label in labels]
    if len(set(labels_list)) < 2:
        return float("nan")
    return float(roc_auc_score(labels_list, [float(score) for score in scores]))


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Average precision Σₙ (Rₙ − Rₙ₋₁) Pₙ over score thresholds (sklearn.metrics.
    average_precision_score; tied scores form one threshold); NaN without positives."""
    from sklearn.metrics import average_precision_score  # scikit-learn takes ~1.5 s to import: loaded when used

    labels_list = [int(label) for label in labels]
    if sum(labels_list) == 0:
        return float("nan")
    return float(average_precision_score(labels_list, [float(score) for score in scores]))




CUSUM_DRIFTS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


CUSUM_THRESHOLDS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def fit_cusum(
    probabilities: Sequence[Sequence[float]], onsets: Sequence[int | None], *, max_false_alarm_rate: float = 0.05
) -> tuple[float, float]:
    """(drift, threshold) of `cusum_alarm` chosen on labelled sequences: among the grid settings
    that alarm on at most `max_false_alarm_rate` of the clean sequences (onset None), the one with
    the smallest median delay in tokens (alarm − onset; a looping sequence that never alarms counts
    as its length − onset). If none meets the rate, the lowest false-alarm rate decides first.
    Ties keep the earlier setting (lower drift, then lower threshold)."""
    if len(probabilities) != len(onsets):
        raise InvalidArgumentError(f"{len(probabilities)} probability sequences but {len(onsets)} onsets.")
    if not 0.0 <= max_false_alarm_rate <= 1.0:
        raise InvalidArgumentError(f"max_false_alarm_rate must be in [0, 1]; got {max_false_alarm_rate!r}.")
    n_clean = sum(onset is None for onset in onsets)
    if n_clean == 0 or n_clean == len(onsets):
        raise InvalidArgumentError("Fitting an alarm needs both clean and looping sequences.")
    best_key, best = None, None
    for drift in CUSUM_DRIFTS:
        for threshold in CUSUM_THRESHOLDS:
            false_alarms, delays = 0, []
            for probability, onset in zip(probabilities, onsets):
                alarm = cusum_alarm(probability, drift=drift, threshold=threshold)
                if onset is None:
                    false_alarms += alarm is not None
                else:
                    delays.append((alarm if alarm is not None else len(probability)) - onset)
            rate = false_alarms / n_clean
            key = (max(rate - max_false_alarm_rate, 0.0), statistics.median(delays))
            if best_key is None or key < best_key:
                best_key, best = key, (drift, threshold)
    return best


# Names that moved (one release of deprecated aliases, then gone).
__getattr__ = moved_names(__name__, {
    "FEATURES": "mechvis.generation.monitor:FEATURES",
    "RepetitionMonitor": "mechvis.generation.monitor:RepetitionMonitor",
    "StreamingFeatures": "mechvis.generation.monitor:StreamingFeatures",
    "WEIGHTS_RESOURCE": "mechvis.generation.monitor:WEIGHTS_RESOURCE",
    "find_induction_heads": "mechvis.generation.monitor:find_induction_heads",
    "rep_labels": "mechvis.generation.monitor:rep_labels",
})
