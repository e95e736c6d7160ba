"""The repetition monitor while decoding: the causal signals of each token computed as it is
decoded (`StreamingFeatures`), the induction heads they read (`find_induction_heads`) and the
logistic monitor over them (`RepetitionMonitor`). The same signals from a finished trace:
`mechvis.analysis.repetition.repetition_features`."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis._validation import activation, check_layers
from mechvis.errors import InvalidArgumentError
from mechvis.models.architecture import pattern_hook
from mechvis.results import Result

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



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


@dataclass
class InductionHeads(Result):
    """Heads found by the repeated-random-tokens probe: `scores[layer, head]` is the mean attention
    from each token of the second copy to the token after its first occurrence."""

    units = {'scores': 'probability'}

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
class RepetitionFeatures(Result):
    """The causal signals of each generated token (`values[:, i]` is FEATURES[i]); higher is
    meant to mean more loop risk for all but activation_z and sink_mass, whose sign is empirical."""

    units = {'values': 'feature units (see FEATURES)'}

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


def feature_layer(model: "TransformerBridge", layer: int | None) -> int:
    """The residual stream the hidden-state signals read (default: two thirds of the depth)."""
    return check_layers(model, [layer if layer is not None else (2 * model.cfg.n_layers) // 3])[0]


def feature_values(
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
        self.layer = feature_layer(model, layer)
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
        return feature_values(
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
        from sklearn.linear_model import LogisticRegression  # scikit-learn: ~1.5 s to import, only when fitting

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


def cusum_alarm(probabilities: Sequence[float], *, drift: float = 0.5, threshold: float = 1.0) -> int | None:
    """Index of the first alarm of a one-sided CUSUM on p − drift (S ← max(0, S + p − drift),
    alarm when S > threshold), or None."""
    total = 0.0
    for index, value in enumerate(probabilities):
        total = max(0.0, total + float(value) - drift)
        if total > threshold:
            return index
    return None
