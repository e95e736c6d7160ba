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
  same signals while decoding, before each token is sampled (for `MonitorTemperature`).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis.analysis._checks import activation, check_layers
from mechvis.analysis.attention import pattern_hook, row_entropy, visible_keys
from mechvis.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace

# --- labels from the text ---------------------------------------------------------------------


def rep_labels(token_ids: Sequence[int], *, n: int = 4, window: int = 200) -> Int[Tensor, " pos"]:
    """1 where the n-gram ending at that token already occurred, ending earlier, within the last
    `window` tokens of `token_ids`; 0 elsewhere (and for the first n − 1 tokens)."""
    if n < 1 or window < 1:
        raise InvalidArgumentError(f"n and window must be positive; got n={n}, window={window}.")
    labels = torch.zeros(len(token_ids), dtype=torch.long)
    last_end: dict[tuple[int, ...], list[int]] = {}
    for end in range(n - 1, len(token_ids)):
        gram = tuple(token_ids[end - n + 1 : end + 1])
        earlier = last_end.setdefault(gram, [])
        if any(end - previous <= window for previous in earlier):
            labels[end] = 1
        earlier.append(end)
    return labels


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


# --- the seed score ---------------------------------------------------------------------------


@dataclass
class SeedScore:
    """The seed's collapse score and its terms, per generated token (positions `positions`)."""

    positions: list[int]
    entropy_term: Float[Tensor, " gen"]  # H_t / log V
    activation_rise: Float[Tensor, " gen"]  # R_t, min-max over the generated tokens
    uniformity: Float[Tensor, " gen"]  # U_t = clip(1 − KL(p ‖ uniform), 0, 1)
    attention_focus: Float[Tensor, " gen"]  # F_t = 1 − H(attention row) / log n
    score: Float[Tensor, " gen"]


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


# --- induction heads --------------------------------------------------------------------------


@dataclass
class InductionHeads:
    """Heads found by the repeated-random-tokens probe: `scores[layer, head]` is the mean attention
    from each token of the second copy to the token after its first occurrence."""

    scores: Float[Tensor, "layer head"]
    heads: list[tuple[int, int]]


def find_induction_heads(
    model: "TransformerBridge", *, length: int = 40, threshold: float = 0.3, top: int = 8, seed: int = 0
) -> InductionHeads:
    """Run [BOS] + R + R for random tokens R and score every head's induction attention.
    Heads scoring at least `threshold`, at most `top` of them, best first."""
    generator = torch.Generator().manual_seed(seed)
    special = set(model.hf_tokenizer.all_special_ids)
    candidates = torch.tensor([t for t in range(1000, min(model.cfg.d_vocab, 20000)) if t not in special])
    randoms = candidates[torch.randperm(len(candidates), generator=generator)[:length]]
    bos = model.hf_tokenizer.bos_token_id
    tokens = torch.cat([torch.tensor([bos if bos is not None else randoms[0].item()]), randoms, randoms])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None].to(model.cfg.device), names_filter=lambda name: name.endswith("hook_pattern"))
    queries = torch.arange(1 + length, 1 + 2 * length)
    keys = queries - length + 1  # the token after the first occurrence of the query's token
    scores = torch.stack(
        [activation(cache, pattern_hook(layer))[:, queries, keys].float().mean(-1) for layer in range(model.cfg.n_layers)]
    )
    order = scores.flatten().argsort(descending=True).tolist()
    n_heads = scores.shape[1]
    heads = [(i // n_heads, i % n_heads) for i in order[:top] if scores.flatten()[i] >= threshold]
    return InductionHeads(scores, heads)


# --- the sound, causal signals ----------------------------------------------------------------

FEATURES = (
    "confidence",  # top-1 probability
    "margin",  # p(1st) − p(2nd)
    "neg_entropy",  # −H, nats
    "neg_varentropy",  # −Σ p (−ln p − H)²
    "activation_z",  # robust z-score of ‖h‖ against the earlier tokens
    "recurrence",  # max cosine to the recent mean-centred hidden states
    "copy_attention",  # induction heads' mass on tokens that followed earlier copies of the token
    "sink_mass",  # mean attention to the first token over layers and heads
)


@dataclass
class RepetitionFeatures:
    """The causal signals of each generated token (`values[:, i]` is FEATURES[i]); higher is
    meant to mean more loop risk for all but activation_z and sink_mass, whose sign is empirical."""

    positions: list[int]
    values: Float[Tensor, "gen feature"]
    names: tuple[str, ...] = FEATURES

    def __getitem__(self, name: str) -> Float[Tensor, " gen"]:
        return self.values[:, self.names.index(name)]


def _robust_z(norms: Tensor, states: list[int], first_reference: int) -> Tensor:
    """(x_q − median) / (1.4826 · MAD) over positions first_reference..q − 1; 0 with < 4 of them."""
    z = torch.zeros(len(states), dtype=norms.dtype)
    for index, q in enumerate(states):  # one reference window per generated token (its own past)
        reference = norms[first_reference:q]
        if reference.numel() >= 4:
            median = reference.quantile(0.5)  # torch.median returns the lower middle value
            mad = (reference - median).abs().quantile(0.5) * 1.4826
            z[index] = (norms[q] - median) / mad.clamp_min(1e-6)
    return z


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
    layer = _feature_layer(model, layer)
    index = torch.tensor(states)
    values = _feature_values(
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


def _feature_layer(model: "TransformerBridge", layer: int | None) -> int:
    """The residual stream the hidden-state signals read (default: two thirds of the depth)."""
    return check_layers(model, [layer if layer is not None else (2 * model.cfg.n_layers) // 3])[0]


def _feature_values(
    logits: Float[Tensor, "gen vocab"],
    hidden: Float[Tensor, "pos d_model"],
    tokens: Int[Tensor, " pos"],
    pattern_rows: Callable[[int], Float[Tensor, "head gen pos"]],
    states: list[int],
    *,
    induction: InductionHeads,
    n_layers: int,
    sinks: Sequence[int],
    prompt_length: int,
    recurrence_window: int,
) -> Float[Tensor, "gen feature"]:
    """FEATURES of the states at positions `states`, from their logits, a residual stream and
    their attention rows (`pattern_rows(layer)`) over positions 0..pos − 1 (causal: nothing after
    a state is read, so a prefix ending at the state gives the same values)."""
    first_content = max(sinks, default=-1) + 1
    index = torch.tensor(states)

    log_probs = logits.double().log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    varentropy = (probs * (log_probs + entropy[:, None]).square()).sum(-1)
    top2 = probs.topk(2, dim=-1).values

    hidden = hidden.double()
    activation_z = _robust_z(hidden.norm(dim=-1), states, first_content)
    prompt_mean = hidden[first_content:prompt_length].mean(0)
    unit = torch.nn.functional.normalize(hidden - prompt_mean, dim=-1)
    cosine = unit[index] @ unit.T  # (generated, all positions)
    offsets = index[:, None] - torch.arange(hidden.shape[0])[None, :]
    recent = (offsets >= 1) & (offsets <= recurrence_window) & (torch.arange(hidden.shape[0])[None, :] >= first_content)
    recurrence = cosine.masked_fill(~recent, -1.0).amax(-1)

    n = tokens.shape[0]
    previous_token = torch.cat([torch.tensor([-1]), tokens[:-1]])  # x_{j−1} for key j
    key = torch.arange(n)
    copy_mask = (previous_token[None, :] == tokens[index][:, None]) & (key[None, :] <= index[:, None]) & (key[None, :] >= 1)
    if induction.heads:
        copy_attention = torch.stack(
            [(pattern_rows(l)[h].double() * copy_mask).sum(-1) for l, h in induction.heads]
        ).amax(0)
    else:
        copy_attention = torch.zeros(len(states), dtype=torch.float64)

    # per layer: the head-averaged attention mass on the sink positions
    sink_mass = torch.stack([pattern_rows(l)[..., list(sinks)].double().sum(-1).mean(0) for l in range(n_layers)]).mean(0)

    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], -entropy, -varentropy, activation_z, recurrence,
                        copy_attention, sink_mass], dim=-1).float()


class StreamingFeatures:
    """FEATURES of each token while it is being decoded, before it is sampled.

    `hooks()` records, at every forward pass of a KV-cached decode through the bridge, the last
    query's attention rows and the residual stream; `step(tokens, logits)` then returns the signals
    of the state that just ran (the last of `tokens`), by the formulas `repetition_features`
    applies to the finished trace.
    """

    def __init__(
        self,
        model: "TransformerBridge",
        induction: InductionHeads,
        *,
        prompt_length: int,
        sinks: Sequence[int],
        layer: int | None = None,
        recurrence_window: int = 64,
    ):
        self.layer = _feature_layer(model, layer)
        self.n_layers = model.cfg.n_layers
        self.induction, self.prompt_length, self.sinks = induction, prompt_length, tuple(sinks)
        self.recurrence_window = recurrence_window
        self._hidden: list[Tensor] = []  # residual rows, one per position decoded so far
        self._rows: dict[int, Tensor] = {}  # layer → (head, keys) attention of the newest query

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, function) pairs for `model.hooks(fwd_hooks=...)` around the decode."""

        def record_row(pattern: Tensor, hook, *, layer: int) -> None:
            self._rows[layer] = pattern[0, :, -1].detach().to("cpu", copy=True)

        def record_hidden(residual: Tensor, hook) -> None:
            self._hidden.extend(residual[0].detach().to("cpu", copy=True))

        return [(pattern_hook(l), functools.partial(record_row, layer=l)) for l in range(self.n_layers)] + [
            (f"blocks.{self.layer}.hook_resid_post", record_hidden)
        ]

    def module_hooks(self, model: "TransformerBridge") -> list[tuple[torch.nn.Module, Callable]] | None:
        """The recordings of `hooks()` as forward hooks on the HF modules the bridge wraps, for a
        decode that runs those modules without the bridge (`mechvis.generate` with no
        intervention): each layer's attention module returns eager attention's weights, which
        are the bridge's `hook_pattern` bit for bit, and the decoder layer's output is
        `hook_resid_post`. None when the model does not expose them (no eager attention, or a
        block without its HF module): then decode through the bridge with `hooks()`."""
        if getattr(model.original_model.config, "_attn_implementation", None) != "eager":
            return None
        blocks = list(model.blocks)
        attentions = [getattr(getattr(block, "attn", None), "_modules", {}).get("_original_component") for block in blocks]
        layer_module = blocks[self.layer]._modules.get("_original_component")
        if any(module is None for module in attentions) or layer_module is None:
            return None

        def record_row(module, args, output, *, layer: int) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(f"Layer {layer}'s attention returned no weights; decode through the bridge instead.")
            self._rows[layer] = weights[0, :, -1].detach().to("cpu", copy=True)

        def record_hidden(module, args, output) -> None:
            residual = output[0] if isinstance(output, tuple) else output
            self._hidden.extend(residual[0].detach().to("cpu", copy=True))

        return [(attention, functools.partial(record_row, layer=l)) for l, attention in enumerate(attentions)] + [
            (layer_module, record_hidden)
        ]

    def step(self, tokens: Int[Tensor, " pos"], logits: Float[Tensor, " vocab"]) -> Float[Tensor, " feature"]:
        """The signals of the state at the last position of `tokens` (every token decoded so far),
        whose next-token logits are `logits`."""
        n = tokens.shape[0]
        if len(self._hidden) != n or len(self._rows) != self.n_layers:
            raise RuntimeError(f"Recorded {len(self._hidden)} residual rows for {n} tokens; were the hooks active?")
        # A sliding-window cache keeps only the last keys: earlier ones got no attention.
        rows = {l: torch.nn.functional.pad(row, (n - row.shape[-1], 0)) for l, row in self._rows.items()}
        return _feature_values(
            logits[None].cpu(),
            torch.stack(self._hidden),
            tokens.cpu(),
            lambda l: rows[l][:, None, :],
            [n - 1],
            induction=self.induction,
            n_layers=self.n_layers,
            sinks=self.sinks,
            prompt_length=self.prompt_length,
            recurrence_window=self.recurrence_window,
        )[0]


# --- the combined monitor ---------------------------------------------------------------------

WEIGHTS_RESOURCE = "repetition_monitor.json"


@dataclass
class RepetitionMonitor:
    """Logistic model over standardised FEATURES: P(token continues a loop) = σ(w·z + b)."""

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    feature_names: tuple[str, ...] = FEATURES
    metadata: dict = field(default_factory=dict)
    alarm_drift: float = 0.5  # the CUSUM alarm's settings (fit_cusum on training sequences)
    alarm_threshold: float = 1.0

    def probability(self, values: Float[Tensor, "n feature"]) -> Float[Tensor, " n"]:
        """P(loop) for rows of feature values in the order of `feature_names`."""
        if values.ndim != 2 or values.shape[1] != len(self.feature_names):
            raise InvalidArgumentError(f"Expected (n, {len(self.feature_names)}) feature values; got {tuple(values.shape)}.")
        standardised = (values.float() - torch.tensor(self.mean)) / torch.tensor(self.std)
        return torch.sigmoid(standardised @ torch.tensor(self.weights) + self.bias)

    def score(self, features: RepetitionFeatures) -> Float[Tensor, " gen"]:
        """P(loop) for each generated token of `features`."""
        if tuple(features.names) != tuple(self.feature_names):
            raise InvalidArgumentError(f"The monitor expects features {self.feature_names}; got {features.names}.")
        return self.probability(features.values)

    def first_alarm(self, probability: Float[Tensor, " gen"]) -> int | None:
        """Index of the first generated token at which the monitor's CUSUM alarm fires, or None."""
        return cusum_alarm(probability.tolist(), drift=self.alarm_drift, threshold=self.alarm_threshold)

    @classmethod
    def fit(
        cls,
        features: Float[Tensor, "n feature"],
        labels: Int[Tensor, " n"],
        *,
        feature_names: tuple[str, ...] = FEATURES,
        l2: float = 1e-2,
        metadata: dict | None = None,
    ) -> "RepetitionMonitor":
        """Maximum-likelihood logistic regression on the standardised features (z = (x − mean) / std,
        std with Bessel's correction) with an L2 penalty on the weights, not the bias:
        minimises mean log-loss + (l2 / 2)·‖w‖², i.e. sklearn's LogisticRegression with
        C = 1 / (l2 · n) (Newton–Cholesky solver)."""
        from sklearn.linear_model import LogisticRegression

        if l2 <= 0:
            raise InvalidArgumentError(f"l2 must be positive; got {l2!r}.")
        x = features.double()
        y = labels.long()
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise InvalidArgumentError(f"Expected (n, feature) features and n labels; got {tuple(x.shape)} and {tuple(y.shape)}.")
        if y.unique().numel() != 2:
            raise InvalidArgumentError("Fitting the monitor needs labels of both classes (0 and 1).")
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        standardised = ((x - mean) / std).numpy()
        model = LogisticRegression(C=1.0 / (l2 * len(y)), solver="newton-cholesky", tol=1e-12, max_iter=200)
        model.fit(standardised, y.numpy())
        return cls(mean.tolist(), std.tolist(), model.coef_[0].tolist(), float(model.intercept_[0]), tuple(feature_names), metadata or {})

    def save(self, path) -> None:
        data = asdict(self)
        data["feature_names"] = list(self.feature_names)
        path.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path=None) -> "RepetitionMonitor":
        """The weights shipped with mechvis (fitted by `mechvis repetition-eval`), or a saved file."""
        text = path.read_text() if path is not None else resources.files("mechvis.data").joinpath(WEIGHTS_RESOURCE).read_text()
        data = json.loads(text)
        data["feature_names"] = tuple(data["feature_names"])
        return cls(**data)


# --- evaluation -------------------------------------------------------------------------------


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (sklearn.metrics.roc_auc_score; ties count half, as Mann–Whitney
    U); NaN without both classes."""
    from sklearn.metrics import roc_auc_score

    labels_list = [int(label) for label in labels]
    if len(set(labels_list)) < 2:
        return float("nan")
    return float(roc_auc_score(labels_list, [float(score) for score in scores]))


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Average precision Σₙ (Rₙ − Rₙ₋₁) Pₙ over score thresholds (sklearn.metrics.
    average_precision_score; tied scores form one threshold); NaN without positives."""
    from sklearn.metrics import average_precision_score

    labels_list = [int(label) for label in labels]
    if sum(labels_list) == 0:
        return float("nan")
    return float(average_precision_score(labels_list, [float(score) for score in scores]))


def cusum_alarm(probabilities: Sequence[float], *, drift: float = 0.5, threshold: float = 1.0) -> int | None:
    """Index of the first alarm of a one-sided CUSUM on p − drift (S ← max(0, S + p − drift),
    alarm when S > threshold), or None."""
    total = 0.0
    for index, value in enumerate(probabilities):
        total = max(0.0, total + float(value) - drift)
        if total > threshold:
            return index
    return None


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
