"""Interventions as hook builders: head and layer ablation (zero, mean, resample), activation
patching, attention steering, activation addition, and a keyword boost for decoding.

An `Intervention` is a list of forward hooks. Apply it with `with intervene(model, a, b): ...`
around `mechvis.run`, `mechvis.generate` or any forward pass: the hooks are removed when the block
exits (nested blocks compose), leaving the model unchanged. Hooks see absolute positions also during
KV-cached generation, where each step's activations cover only the new token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechvis._validation import check_heads, check_integer, check_layers, check_positions, check_real, check_token_ids, shown
from mechvis.errors import InvalidArgumentError
from mechvis.generation.recorders import Recorder
from mechvis.running import run
from mechvis.text import single_token_id

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.running import Run

Head = tuple[int, int]
HookFunction = Callable[[Tensor, object], Tensor]
Method = Literal["zero", "mean", "resample"]
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


@dataclass
class Intervention:
    """Forward hooks (hook name, function) applied together; `a + b` applies both."""

    hooks: list[tuple[str, HookFunction]] = field(default_factory=list)
    description: str = ""

    def __add__(self, other: "Intervention") -> "Intervention":
        return Intervention(self.hooks + other.hooks, " + ".join(d for d in (self.description, other.description) if d))


@contextmanager
def intervene(model: "TransformerBridge", *interventions: Intervention) -> Iterator["TransformerBridge"]:
    """Apply `interventions` to every forward pass inside the block (run, generate, run_with_cache);
    remove them on exit, even after an error.

    Raises:
        InvalidArgumentError: an argument that is not an `Intervention` (from `ablate_heads`,
            `add_vector`, `steer_attention`, ...)."""
    for index, intervention in enumerate(interventions):
        if not isinstance(intervention, Intervention):
            raise InvalidArgumentError(
                f"intervene takes Interventions (from ablate_heads, ablate_layers, add_vector, steer_attention, ...); "
                f"argument {index + 1} is {shown(intervention)}."
            )
    hooks = [hook for intervention in interventions for hook in intervention.hooks]
    with model.hooks(fwd_hooks=hooks):
        yield model


def _check_heads(model: "TransformerBridge", heads: Sequence[Head]) -> list[Head]:
    if not heads:
        raise InvalidArgumentError("No heads given; pass (layer, head) pairs such as [(3, 1)].")
    checked = []
    for pair in heads:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidArgumentError(f"A head is a (layer, head) pair; got {pair!r}.")
        layer, head = pair
        checked.append((check_layers(model, [layer])[0], check_heads(model, [head])[0]))
    return checked


# --- ablation --------------------------------------------------------------------------------


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def reference_means(runs: Sequence["Run"], names: Sequence[str]) -> dict[str, Tensor]:
    """Mean of each named activation over every token of every run (the mean-ablation reference);
    the first token of each run, an attention sink with outsized activations, is left out."""
    if not runs:
        raise InvalidArgumentError("Mean ablation needs at least one reference run.")
    means = {}
    for name in names:
        rows = []
        for run in runs:
            if name not in run.cache:
                raise InvalidArgumentError(f"A reference run's cache lacks '{name}'; run it without a names_filter.")
            activation = run.cache[name][0]
            rows.append(activation[1:] if activation.shape[0] > 1 else activation)
        means[name] = torch.cat(rows).mean(0)
    return means


def _replacement(method: Method, name: str, reference: "Run | CachedReference | Sequence[Run] | None") -> Callable[[Tensor, int], Tensor]:
    """f(activation, offset) → what replaces the activation (same shape), for one hook."""
    if method == "zero":
        return lambda activation, offset: torch.zeros_like(activation)
    if method == "mean":
        runs = [reference] if hasattr(reference, "cache") else list(reference or [])
        mean = reference_means(runs, [name])[name]
        return lambda activation, offset: mean.to(activation).expand_as(activation)
    if method == "resample":
        if reference is None or not hasattr(reference, "cache"):
            raise InvalidArgumentError("Resample ablation needs one reference Run of the same length as the input.")
        if name not in reference.cache:
            raise InvalidArgumentError(f"The reference run's cache lacks '{name}'; run it without a names_filter.")
        source = reference.cache[name][0]

        def resampled(activation: Tensor, offset: int) -> Tensor:
            stop = offset + activation.shape[1]
            if stop > source.shape[0]:
                raise InvalidArgumentError(
                    f"Resample ablation: the reference has {source.shape[0]} tokens, the input at least {stop}; "
                    f"use a reference of the same length."
                )
            return source[offset:stop].to(activation).expand_as(activation)

        return resampled
    raise InvalidArgumentError(f"method must be 'zero', 'mean' or 'resample'; got {method!r}.")


def _offset(activation: Tensor, context: dict) -> int:
    """Absolute position of the activation's first token: 0 for a pass over several tokens (a
    prompt), and during KV-cached generation, where each step passes one new token, the number of
    tokens seen since. (A one-token prompt after a longer pass would count as a continuation.)"""
    n = activation.shape[1]
    if n > 1 or context.get("seen", 0) == 0:
        context["seen"] = n
        return 0
    offset = context["seen"]
    context["seen"] += n
    return offset


def ablate_heads(
    model: "TransformerBridge", heads: Sequence[Head], *, method: Method = "zero", reference: "Run | Sequence[Run] | None" = None
) -> Intervention:
    """Replace the output (hook_z) of each (layer, head): with zeros, with its mean over the
    reference runs (`method="mean"`), or with its value on one reference run of the same length
    (`method="resample"`)."""
    checked = _check_heads(model, heads)
    hooks = []
    for layer in sorted({layer for layer, _ in checked}):
        chosen = [head for l, head in checked if l == layer]
        replace = _replacement(method, _z_name(layer), reference)
        context: dict = {}

        def hook(z: Tensor, hook: object, chosen: list[int] = chosen, replace=replace, context=context) -> Tensor:
            offset = _offset(z, context)
            z = z.clone()
            z[:, :, chosen] = replace(z, offset)[:, :, chosen]
            return z

        hooks.append((_z_name(layer), hook))
    return Intervention(hooks, f"{method}-ablate heads {checked}")


def ablate_layers(
    model: "TransformerBridge",
    layers: Sequence[int],
    *,
    component: Literal["attn", "mlp"] = "attn",
    method: Method = "zero",
    reference: "Run | Sequence[Run] | None" = None,
) -> Intervention:
    """Replace whole attention (`component="attn"`) or MLP outputs of `layers`, as ablate_heads."""
    if component not in ("attn", "mlp"):
        raise InvalidArgumentError(f"component must be 'attn' or 'mlp'; got {component!r}.")
    hooks = []
    for layer in check_layers(model, layers):
        name = f"blocks.{layer}.hook_{component}_out"
        replace = _replacement(method, name, reference)
        context: dict = {}

        def hook(activation: Tensor, hook: object, replace=replace, context=context) -> Tensor:
            return replace(activation, _offset(activation, context))

        hooks.append((name, hook))
    return Intervention(hooks, f"{method}-ablate {component} of layers {layers}")


# --- metrics ---------------------------------------------------------------------------------


def target_probability(model: "TransformerBridge", target: int | str, *, position: int = -1) -> Metric:
    """Metric: probability of `target` at `position`."""
    token = single_token_id(model, target)
    return lambda logits: logits[:, position].float().softmax(-1)[:, token]


def logit_difference(model: "TransformerBridge", answer: int | str, counterfactual: int | str, *, position: int = -1) -> Metric:
    """Metric: logit(answer) − logit(counterfactual) at `position`."""
    a, b = single_token_id(model, answer), single_token_id(model, counterfactual)
    return lambda logits: (logits[:, position, a] - logits[:, position, b]).float()


def loss(tokens: Int[Tensor, " pos"]) -> Metric:
    """Metric: mean next-token cross-entropy (nats) of `tokens` (the text being run)."""
    targets = tokens[1:]
    return lambda logits: torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.to(logits.device)[None].expand(logits.shape[0], -1), reduction="none"
    ).mean(-1)


def repetition_confidence(positions: Sequence[int]) -> Metric:
    """Metric: mean top-1 probability over `positions` (e.g. a trace's generated positions − 1),
    the repetition signal computable from logits alone: it rises in loops (held-out AUROC 0.77 in
    the repetition evaluation)."""
    chosen = list(positions)
    if not chosen:
        raise InvalidArgumentError("No positions for the repetition metric.")
    return lambda logits: logits[:, chosen].float().softmax(-1).amax(-1).mean(-1)


# --- the ablation sweep ----------------------------------------------------------------------

REFERENCE_TEXTS = (
    "The weather was mild, and the market square filled slowly with people buying bread and fruit.",
    "In 1887 the railway reached the valley, and within ten years the village had doubled in size.",
    "To install the package, open a terminal, create a virtual environment and run the installer.",
    "She read the letter twice, folded it carefully and put it back into the drawer of her desk.",
)


@dataclass
class CachedReference:
    """A reference for mean or resample ablation that holds only a cache (see `reference_tokens`)."""

    cache: object


def reference_runs(model: "TransformerBridge", texts: Sequence[str] = REFERENCE_TEXTS) -> list["Run"]:
    """Runs of neutral reference texts, the default reference set for mean ablation."""

    return [run(model, text) for text in texts]


def reference_tokens(model: "TransformerBridge", n_tokens: int, texts: Sequence[str] = REFERENCE_TEXTS) -> CachedReference:
    """A resample reference of exactly `n_tokens`: the first tokens of the reference texts joined."""
    ids = model.hf_tokenizer.encode(" ".join(texts * (1 + n_tokens // 20)), add_special_tokens=False)[:n_tokens]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.cfg.device))
    return CachedReference(cache)


@dataclass
class AblationSweep:
    """metric(ablated) − metric(clean) for every (layer, head), in the metric's units."""

    effect: Float[Tensor, "layer head"]
    baseline: float
    method: str

    def top(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The `n` heads whose ablation moves the metric most, largest |effect| first."""
        flat = self.effect.flatten()
        n_heads = self.effect.shape[1]
        order = flat.abs().argsort(descending=True)[:n].tolist()
        return [(i // n_heads, i % n_heads, flat[i].item()) for i in order]


def ablation_sweep(
    model: "TransformerBridge",
    tokens: Int[Tensor, " pos"],
    metric: Metric,
    *,
    method: Method = "zero",
    reference: "Run | Sequence[Run] | None" = None,
    batch_size: int = 16,
) -> AblationSweep:
    """Ablate every head on its own and measure the metric; `batch_size` ablations share one
    batched forward pass (each batch row ablates a different head)."""
    tokens = check_token_ids(model, tokens).to(model.cfg.device)
    batch_size = check_integer(batch_size, "batch_size", low=1)
    if not callable(metric):
        raise InvalidArgumentError(
            f"metric must be a function logits (batch, pos, vocab) → (batch,) scores, e.g. "
            f"target_probability(model, ' Paris'); got {shown(metric)}."
        )
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    replacements = {layer: _replacement(method, _z_name(layer), reference) for layer in range(n_layers)}
    with torch.no_grad():
        baseline = metric(model(tokens[None]))[0].item()
    pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    effect = torch.empty(len(pairs))
    chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    for start, chunk in zip(range(0, len(pairs), batch_size), tqdm(chunks, desc=f"{method}-ablating heads", unit="batch")):
        hooks = []
        for layer in sorted({layer for layer, _ in chunk}):
            rows = torch.tensor([row for row, (l, _) in enumerate(chunk) if l == layer])
            heads = torch.tensor([head for l, head in chunk if l == layer])

            def hook(z: Tensor, hook: object, rows=rows, heads=heads, replace=replacements[layer]) -> Tensor:
                z = z.clone()
                z[rows, :, heads] = replace(z, 0)[rows, :, heads]
                return z

            hooks.append((_z_name(layer), hook))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            effect[start : start + len(chunk)] = (metric(model(tokens[None].expand(len(chunk), -1))) - baseline).cpu()
    return AblationSweep(effect.view(n_layers, n_heads), baseline, method)


# --- activation patching ---------------------------------------------------------------------


def patch_activation(clean: "Run", name: str, *, positions: Sequence[int] | None = None) -> Intervention:
    """Replace activation `name` with its value on the clean run (at `positions`, default all)."""
    if name not in clean.cache:
        raise InvalidArgumentError(f"The clean run's cache lacks '{name}'; run it without a names_filter.")
    source = clean.cache[name]
    chosen = check_positions(source.shape[1], positions)

    def hook(activation: Tensor, hook: object) -> Tensor:
        if activation.shape[1] != source.shape[1]:
            raise InvalidArgumentError(
                f"Patching needs inputs of one length: clean has {source.shape[1]} tokens, this pass {activation.shape[1]}."
            )
        activation = activation.clone()
        activation[:, chosen] = source[:, chosen].to(activation)
        return activation

    return Intervention([(name, hook)], f"patch {name} from the clean run")


@dataclass
class PatchingResult:
    """Effect of patching each clean activation into the corrupted run, normalised so that 0 is the
    corrupted metric and 1 the clean one: (patched − corrupted) / (clean − corrupted)."""

    kind: str
    normalised: Float[Tensor, "layer index"]  # index: position (resid, mlp) or head
    patched: Float[Tensor, "layer index"]
    clean: float
    corrupted: float


def activation_patching(
    model: "TransformerBridge",
    clean: "Run",
    corrupted: "Run",
    metric: Metric,
    *,
    kind: Literal["resid_pre", "mlp_out", "heads"] = "resid_pre",
) -> PatchingResult:
    """Patch clean activations into the corrupted run one at a time: the residual stream entering
    each layer at each position ("resid_pre"), each MLP output at each position ("mlp_out"), or each
    head's output at every position ("heads"). One batched forward pass per layer."""
    n_clean, n_corrupted = len(clean.tokens), len(corrupted.tokens)
    if n_clean != n_corrupted:
        raise InvalidArgumentError(
            f"Clean and corrupted prompts must have the same number of tokens; got {n_clean} and {n_corrupted}."
        )
    if kind not in ("resid_pre", "mlp_out", "heads"):
        raise InvalidArgumentError(f"kind must be 'resid_pre', 'mlp_out' or 'heads'; got {kind!r}.")
    tokens = corrupted.tokens.to(model.cfg.device)
    with torch.no_grad():
        clean_value = metric(clean.logits[None])[0].item()
        corrupted_value = metric(corrupted.logits[None])[0].item()
    width = model.cfg.n_heads if kind == "heads" else n_clean
    patched = torch.empty(model.cfg.n_layers, width)
    for layer in tqdm(range(model.cfg.n_layers), desc=f"patching {kind}", unit="layer"):
        name = _z_name(layer) if kind == "heads" else f"blocks.{layer}.hook_{kind}"
        if name not in clean.cache:
            raise InvalidArgumentError(f"The clean run's cache lacks '{name}'; run it without a names_filter.")
        source = clean.cache[name][0]
        rows = torch.arange(width)

        def hook(activation: Tensor, hook: object, source=source, rows=rows) -> Tensor:
            activation = activation.clone()
            if kind == "heads":
                activation[rows, :, rows] = source[:, rows].transpose(0, 1).to(activation)
            else:
                activation[rows, rows] = source[rows].to(activation)
            return activation

        with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
            patched[layer] = metric(model(tokens[None].expand(width, -1))).cpu()
    span = clean_value - corrupted_value
    if abs(span) < 1e-12:
        raise InvalidArgumentError("The metric is the same on the clean and the corrupted run; nothing to attribute.")
    return PatchingResult(kind, (patched - corrupted_value) / span, patched, clean_value, corrupted_value)


# --- steering --------------------------------------------------------------------------------


def steer_attention(
    model: "TransformerBridge",
    key_positions: Sequence[int],
    factor: float,
    *,
    query_positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Intervention:
    """Multiply the attention that queries pay to `key_positions` by `factor` and renormalise each
    row to sum to 1, at `layers` (default all) and `heads` (default all). `query_positions` default
    to every query, including tokens generated later."""
    if not key_positions:
        raise InvalidArgumentError("No key positions to steer toward (see mechvis.analysis.find_token_spans).")
    if not factor >= 0:
        raise InvalidArgumentError(f"factor must be ≥ 0; got {factor!r}.")
    chosen_heads = list(range(model.cfg.n_heads)) if heads is None else check_heads(model, heads)
    keys = torch.tensor(sorted(set(key_positions)))
    if (keys < 0).any():
        raise InvalidArgumentError("key positions are absolute token positions (≥ 0).")
    queries = None if query_positions is None else torch.tensor(sorted(set(query_positions)))
    hooks = []
    for layer in check_layers(model, layers):
        def hook(pattern: Tensor, hook: object) -> Tensor:
            n_queries, n_keys = pattern.shape[-2], pattern.shape[-1]
            offset = n_keys - n_queries  # absolute position of the first query
            in_range = keys[keys < n_keys]
            rows = torch.arange(n_queries) if queries is None else (queries - offset)[(queries >= offset) & (queries < n_keys)]
            if rows.numel() == 0 or in_range.numel() == 0:
                return pattern
            head_index, row_index = torch.tensor(chosen_heads)[:, None], rows[None, :]
            block = pattern[:, head_index, row_index]  # (batch, heads, rows, keys)
            block[..., in_range] = block[..., in_range] * factor
            pattern = pattern.clone()
            pattern[:, head_index, row_index] = block / block.sum(-1, keepdim=True).clamp_min(1e-30)
            return pattern

        hooks.append((f"blocks.{layer}.attn.hook_pattern", hook))
    return Intervention(hooks, f"scale attention to {sorted(set(key_positions))} by {factor}")


def add_vector(
    model: "TransformerBridge",
    layer: int,
    vector: Float[Tensor, " d_model"],
    *,
    scale: float = 1.0,
    positions: Sequence[int] | None = None,
) -> Intervention:
    """Add `scale · vector` to the residual stream after `layer` (resid_post) at `positions`
    (absolute; default every position, including generated ones)."""
    (layer,) = check_layers(model, [layer])
    if not isinstance(vector, torch.Tensor) or vector.ndim != 1 or vector.shape[0] != model.cfg.d_model:
        raise InvalidArgumentError(f"The steering vector must be a tensor of shape ({model.cfg.d_model},); got {shown(vector)}.")
    if not bool(torch.isfinite(vector).all()):
        raise InvalidArgumentError("The steering vector holds NaN or infinite values; every run would return NaN logits.")
    scale = check_real(scale, "scale")
    chosen = None if positions is None else torch.tensor(sorted(set(positions)))
    context: dict = {}

    def hook(residual: Tensor, hook: object) -> Tensor:
        offset = _offset(residual, context)
        addition = (scale * vector).to(residual)
        if chosen is None:
            return residual + addition
        rows = (chosen - offset)[(chosen >= offset) & (chosen < offset + residual.shape[1])]
        residual = residual.clone()
        residual[:, rows] += addition
        return residual

    return Intervention([(f"blocks.{layer}.hook_resid_post", hook)], f"add a vector after layer {layer}")


def steering_vector(model: "TransformerBridge", positive: Sequence[str], negative: Sequence[str], layer: int) -> Float[Tensor, " d_model"]:
    """Mean residual stream after `layer` over the `positive` prompts minus that over the `negative`
    ones (each prompt averaged over its tokens after the first)."""

    (layer,) = check_layers(model, [layer])
    if not positive or not negative:
        raise InvalidArgumentError("A steering vector needs at least one positive and one negative prompt.")
    name = f"blocks.{layer}.hook_resid_post"

    def mean_of(prompts: Sequence[str]) -> Tensor:
        runs = [run(model, prompt, names_filter=[name]) for prompt in prompts]
        return reference_means(runs, [name])[name]

    return mean_of(positive) - mean_of(negative)


class KeywordBoost(Recorder):
    """A steerer for `generate(..., recorders=[boost])`: its logits step adds `bias` (in logits)
    to every token of each keyword (a token id, or a string tokenised as given: mind the leading
    space, ' Paris' and 'Paris' are different tokens). Also an HF logits processor
    f(input_ids, scores) → scores."""

    def __init__(self, model: "TransformerBridge", keywords: Sequence[int | str], bias: float):
        ids: set[int] = set()
        for keyword in keywords:
            if isinstance(keyword, str):
                encoded = model.hf_tokenizer.encode(keyword, add_special_tokens=False)
                if not encoded:
                    raise InvalidArgumentError(f"Keyword {keyword!r} has no tokens.")
                ids.update(encoded)
            else:
                ids.add(single_token_id(model, keyword))
        if not ids:
            raise InvalidArgumentError("No keywords to boost.")
        self.token_ids = torch.tensor(sorted(ids))
        self.bias = float(bias)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.clone()
        scores[:, self.token_ids.to(scores.device)] += self.bias
        return scores

    logits_step = __call__

