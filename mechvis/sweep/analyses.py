"""The sweep's analysis registry: a name → a function of one item's forward pass returning rows.

A new analysis is one decorated function:

    @register("norms", schema=[("layer", pa.int16()), ("norm", pa.float32())],
              hooks=lambda model, params: hooks_for(model, "norms"))
    def _norms(context, item, forward, params):
        ...
        return {"layer": [...], "norm": [...]}       # columns of equal length (long format)

Every table also starts with the common columns `item_id`, `condition`, `pair` (COMMON_SCHEMA).
Analyses use mechvis's public API only; the shared forward pass (`Forward`) is run once per item
with the union of the hooks the chosen analyses read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

import mechvis
from mechvis.analysis import head_entropy, hooks_for, logit_lens, token_signals
from mechvis.analysis.repetition import repetition_features
from mechvis.analysis.vision import image_attention, region_metrics, vision_rollout
from mechvis.errors import InvalidArgumentError, MechvisError
from mechvis.generation.monitor import RepetitionMonitor, find_induction_heads, rep_labels
from mechvis.interventions import ablation_sweep, reference_runs, target_probability
from mechvis.studies.repetition_eval import analysis_hooks
from mechvis.sweep.dataset import Item, require
from mechvis.text import encode

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis import Run, Trace

COMMON_SCHEMA = [("item_id", pa.string()), ("condition", pa.string()), ("pair", pa.string())]


@dataclass
class Forward:
    """One item's shared forward pass: `run` (prompt, plus the continuation or the generated
    tokens), the `trace` when the item generated or was teacher-forced, and `answer_position`, the
    position whose next-token distribution is the item's answer (the prompt's last token)."""

    run: "Run"
    answer_position: int
    trace: "Trace | None" = None


@dataclass
class Context:
    """What a worker keeps across items: the model and per-model state analyses compute once."""

    model: "TransformerBridge"
    memo: dict = field(default_factory=dict)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@dataclass(frozen=True)
class Analysis:
    name: str
    schema: pa.Schema  # the full table schema, common columns first
    compute: Callable[[Context, Item, Forward, dict], dict[str, list]]
    hooks: Callable[["TransformerBridge", dict], list[str]]
    defaults: dict
    check: Callable[[list[Item], dict], None]  # dataset-level validation, before any model work
    doc: str
    reads_target: bool = False  # uses the item's `target`, which must then be one token (checked at plan time)


ANALYSES: dict[str, Analysis] = {}


def register(name: str, *, schema: list[tuple[str, pa.DataType]], hooks=lambda model, params: [], defaults=None, check=None,
             reads_target: bool = False):
    """Register `compute(context, item, forward, params) -> {column: values}` as analysis `name`."""

    def decorate(compute):
        ANALYSES[name] = Analysis(
            name, pa.schema(COMMON_SCHEMA + list(schema)), compute, hooks, dict(defaults or {}),
            check or (lambda items, params: None), (compute.__doc__ or "").strip(), reads_target,
        )
        return compute

    return decorate


def resolve(analyses: list[str], params: dict | None = None) -> dict[str, dict]:
    """{analysis: full parameters} for the chosen names; unknown names or parameters raise."""
    params = params or {}
    if isinstance(analyses, str):
        raise InvalidArgumentError(f"analyses must be a list of names, e.g. [{analyses!r}]; got the string {analyses!r}.")
    if not analyses:
        raise InvalidArgumentError(f"Choose at least one analysis from {sorted(ANALYSES)}.")
    unknown = [name for name in list(analyses) + list(params) if name not in ANALYSES]
    if unknown:
        raise InvalidArgumentError(f"Unknown analyses {unknown}; choose from {sorted(ANALYSES)}.")
    if len(set(analyses)) != len(analyses):
        raise InvalidArgumentError(f"An analysis is named twice in {analyses}.")
    stray = [name for name in params if name not in analyses]
    if stray:
        raise InvalidArgumentError(f"Parameters given for analyses not chosen: {stray}.")
    resolved = {}
    for name in analyses:
        given = params.get(name, {})
        bad = sorted(set(given) - set(ANALYSES[name].defaults))
        if bad:
            raise InvalidArgumentError(f"Unknown parameters {bad} of {name!r}; it takes {sorted(ANALYSES[name].defaults)}.")
        for key, value in given.items():
            _check_parameter(name, key, value, ANALYSES[name].defaults[key])
        resolved[name] = {**ANALYSES[name].defaults, **given}
    return resolved


# Bounds of the numeric parameters and choices of the textual ones (checked before any model work).
PARAMETER_BOUNDS = {"k": (1, 1000), "batch_size": (1, 1024)}
PARAMETER_CHOICES = {"method": ("zero", "mean", "resample")}


def _check_parameter(analysis: str, key: str, value, default) -> None:
    """A parameter must have its default's type, within its bounds or choices."""
    where = f"{analysis}.{key}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif isinstance(default, int):
        low, high = PARAMETER_BOUNDS.get(key, (0, 2**31 - 1))
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        wanted = f"an integer in [{low}, {high}]"
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        wanted = "a list of non-negative integers"
    elif isinstance(default, str):
        choices = PARAMETER_CHOICES.get(key)
        ok = isinstance(value, str) and (choices is None or value in choices)
        wanted = f"one of {list(choices)}" if choices else "a string"
    else:
        ok, wanted = True, ""
    if not ok:
        raise InvalidArgumentError(f"Parameter {where} must be {wanted}; got {value!r}.")


def _target(item: Item, forward: Forward, model) -> int | str | None:
    if item.target is not None:
        return item.target
    if forward.trace is not None and forward.trace.generated_ids:
        return int(forward.trace.generated_ids[0])  # the first continuation / generated token
    return None


# --- lens ---------------------------------------------------------------------------------------

def _lens_hooks(model, params):
    return hooks_for(model, "lens" if params["include_resid_mid"] else "similarity")


@register(
    "lens",
    schema=[
        ("layer", pa.int16()), ("layer_label", pa.string()), ("position", pa.int32()),
        ("top_ids", pa.list_(pa.int64())), ("top_tokens", pa.list_(pa.string())), ("top_probs", pa.list_(pa.float32())),
        ("top1_token", pa.string()), ("top1_prob", pa.float32()),
        ("target_id", pa.int64()), ("target_token", pa.string()), ("target_prob", pa.float32()), ("target_rank", pa.int64()),
        ("entropy", pa.float32()), ("kl_from_final", pa.float32()),
    ],
    hooks=_lens_hooks,
    defaults={"k": 3, "include_resid_mid": False},
    reads_target=True,
)
def lens_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Logit lens at the answer position, one row per layer ("embed", 0, 1, ...): top-k tokens,
    the target's probability and rank (0 = top-1), entropy and KL(final ‖ layer) in nats. The
    target is the item's `target`, else its first continuation/generated token, else the final
    layer's top-1 token."""

    lens = logit_lens(forward.run, positions=[forward.answer_position],
                      target=_target(item, forward, context.model), k=params["k"],
                      include_resid_mid=params["include_resid_mid"])
    n = len(lens.layer_labels)
    target_id = int(lens.target_ids[0])
    target_token = context.model.hf_tokenizer.decode([target_id])
    return {
        "layer": list(range(n)), "layer_label": lens.layer_labels, "position": [forward.answer_position] * n,
        "top_ids": lens.top_ids[:, 0].tolist(), "top_tokens": [row[0] for row in lens.top_tokens],
        "top_probs": lens.top_probs[:, 0].tolist(),
        "top1_token": [row[0][0] for row in lens.top_tokens], "top1_prob": lens.top_probs[:, 0, 0].tolist(),
        "target_id": [target_id] * n, "target_token": [target_token] * n,
        "target_prob": lens.target_probs[:, 0].tolist(), "target_rank": lens.target_ranks[:, 0].tolist(),
        "entropy": lens.entropy[:, 0].tolist(), "kl_from_final": lens.kl_from_final[:, 0].tolist(),
    }


# --- heads --------------------------------------------------------------------------------------

def _attention_hooks(model, params):
    return hooks_for(model, "attention")


@register(
    "heads",
    schema=[("layer", pa.int16()), ("head", pa.int16()), ("entropy", pa.float32()),
            ("normalised_entropy", pa.float32()), ("sink_mass", pa.float32())],
    hooks=_attention_hooks,
    defaults={"sink_positions": [0]},
)
def heads_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Per layer × head, means over query positions: row entropy (nats, over all queries),
    normalised entropy (entropy / log visible keys, over queries seeing > 1 key) and the
    attention mass on the sink positions (over queries past the sinks)."""

    result = head_entropy(forward.run, sink_positions=params["sink_positions"])
    n_layers, n_heads = result.entropy.shape[:2]
    layers = torch.tensor(result.layers).repeat_interleave(n_heads)
    return {
        "layer": layers.tolist(), "head": torch.arange(n_heads).repeat(n_layers).tolist(),
        "entropy": result.entropy.mean(-1).flatten().tolist(),
        "normalised_entropy": result.mean_normalised.flatten().tolist(),
        "sink_mass": result.mean_sink_mass.flatten().tolist(),
    }


# --- tokens -------------------------------------------------------------------------------------

@register(
    "tokens",
    schema=[("position", pa.int32()), ("token_id", pa.int64()), ("token", pa.string()), ("kind", pa.string()),
            ("entropy", pa.float32()), ("varentropy", pa.float32()), ("top1_prob", pa.float32()),
            ("margin", pa.float32()), ("surprisal", pa.float32())],
    defaults={},
)
def tokens_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Per position of the forward pass: the next-token distribution's entropy (nats),
    varentropy (nats²), top-1 probability, top-1 − top-2 margin and the surprisal of the next
    token (nats; null at the last position)."""

    run = forward.run
    signals = token_signals(run.logits, run.tokens)
    surprisal = [None if value != value else value for value in signals.surprisal.tolist()]
    return {
        "position": list(range(len(run.tokens))), "token_id": run.tokens.tolist(), "token": list(run.str_tokens),
        "kind": [run.segments.kind_at(p) for p in range(len(run.tokens))],
        "entropy": signals.entropy.tolist(), "varentropy": signals.varentropy.tolist(),
        "top1_prob": signals.top1_prob.tolist(), "margin": signals.margin.tolist(), "surprisal": surprisal,
    }


# --- repetition ---------------------------------------------------------------------------------

def _repetition_hooks(model, params):
    return analysis_hooks(model, (2 * model.cfg.n_layers) // 3)


@register(
    "repetition",
    schema=[("step", pa.int32()), ("position", pa.int32()), ("token_id", pa.int64()), ("token", pa.string()),
            ("probability", pa.float32()), ("label", pa.int8()), ("alarm", pa.bool_())],
    hooks=_repetition_hooks,
    check=lambda items, params: require(items, "repetition", lambda item: item.generates or item.continuation is not None,
                                        "scores generated text: give the item 'generate' or 'continuation'."),
    defaults={},
)
def repetition_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Per generated (or teacher-forced) token: the shipped repetition monitor's P(loop), the
    n-gram repetition label (1 = continues an earlier 4-gram) and `alarm` (true at the step
    where the monitor's CUSUM alarm first fires)."""

    model = context.model
    monitor = context.once("monitor", RepetitionMonitor.load)
    induction = context.once("induction", lambda: find_induction_heads(model))
    trace = forward.trace
    features = repetition_features(trace, induction=induction, layer=(2 * model.cfg.n_layers) // 3)
    probability = monitor.score(features)
    alarm = monitor.first_alarm(probability)
    n = len(trace.generated_ids)
    return {
        "step": list(range(n)), "position": list(trace.generated_positions), "token_id": list(trace.generated_ids),
        "token": model.hf_tokenizer.batch_decode([[t] for t in trace.generated_ids]),
        "probability": probability.tolist(), "label": rep_labels(trace.generated_ids).tolist(),
        "alarm": [step == alarm for step in range(n)],
    }


# --- image --------------------------------------------------------------------------------------

def _image_hooks(model, params):
    """The language model's attention patterns, plus what `vision_rollout` reads from the vision
    tower: LLaVA's encoder attention patterns, Qwen-VL's cached pixels (its patterns are recomputed)."""

    vision = [name for name in model.hook_dict if name == "vision_encoder.hook_in"
              or (name.startswith("vision_encoder.encoder_layers.") and name.endswith(".attn.hook_pattern"))]
    return sorted(set(hooks_for(model, "attention")) | set(vision))


def _rollout_summary(context: Context, forward: Forward, grid) -> dict[str, float | int | None]:
    """The answer position's vision rollout (`vision_rollout`, mean head fusion, residual weight
    0.5): the share of its language-model rollout on the image block, and over the patch grid the
    peak patch (row, col, mass) and the entropy (nats) of the rollout map; None where the model's
    layout is not mapped."""

    try:
        rolled = vision_rollout(forward.run, grid=grid, query_positions=[forward.answer_position])
    except InvalidArgumentError:  # a layout vision_rollout does not map (e.g. tiled LLaVA-NeXT)
        return dict.fromkeys(("rollout_image_mass", "rollout_peak_row", "rollout_peak_col", "rollout_peak_mass", "rollout_entropy"))
    patch_map = rolled.maps[0].double()
    peak = int(patch_map.argmax())
    return {
        "rollout_image_mass": float(rolled.image_mass[0]), "rollout_peak_row": peak // rolled.patch_shape[1],
        "rollout_peak_col": peak % rolled.patch_shape[1], "rollout_peak_mass": float(patch_map[peak]),
        "rollout_entropy": float(torch.special.entr(patch_map).sum()),
    }


@register(
    "image",
    schema=[("layer", pa.int16()), ("image_mass", pa.float32()), ("entropy", pa.float32()),
            ("normalised_entropy", pa.float32()), ("gini", pa.float32()), ("k90_fraction", pa.float32()),
            ("peak_to_mean", pa.float32()), ("centre_row", pa.float32()), ("centre_col", pa.float32()),
            ("spatial_variance", pa.float32()),
            ("rollout_image_mass", pa.float32()), ("rollout_peak_row", pa.int32()), ("rollout_peak_col", pa.int32()),
            ("rollout_peak_mass", pa.float32()), ("rollout_entropy", pa.float32())],
    hooks=_image_hooks,
    check=lambda items, params: require(items, "image", lambda item: item.image is not None, "needs an 'image'."),
    defaults={},
)
def image_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Per layer, attention from the answer position to the image tokens: the mass on the image
    (mean over heads) and the region metrics (nats, cells; see `region_metrics`) of the
    head-averaged map renormalised over the image. Every row of the item also carries its rollout
    summary (`_rollout_summary`, one value per item; null where the layout is not mapped)."""

    grid = forward.run.segments.image_grid
    if grid is None:
        raise InvalidArgumentError(f"Item {item.id!r}: this model's image layout has no grid; the image analysis needs one.")
    attention = image_attention(forward.run, grid=grid, query_positions=[forward.answer_position])
    mass = attention.image_mass[:, :, 0]  # layer head
    weighted = (attention.maps[:, :, 0] * mass[..., None]).sum(1)  # head-averaged map, by image mass
    metrics = region_metrics(weighted, grid)
    return {
        "layer": attention.layers, "image_mass": mass.mean(1).tolist(), "entropy": metrics.entropy.tolist(),
        "normalised_entropy": metrics.normalised_entropy.tolist(), "gini": metrics.gini.tolist(),
        "k90_fraction": metrics.k90_fraction.tolist(), "peak_to_mean": metrics.peak_to_mean.tolist(),
        "centre_row": metrics.centre[:, 0].tolist(), "centre_col": metrics.centre[:, 1].tolist(),
        "spatial_variance": metrics.spatial_variance.tolist(),
        **{name: [value] * len(attention.layers) for name, value in _rollout_summary(context, forward, grid).items()},
    }


# --- ablation -----------------------------------------------------------------------------------

def _check_ablation(items, params):
    if params["method"] not in ("zero", "mean"):
        raise InvalidArgumentError(f"ablation method must be 'zero' or 'mean'; got {params['method']!r}.")
    require(items, "ablation", lambda item: item.target is not None and item.image is None and not item.generates,
            "needs a one-token 'target' and a text prompt (no image, no generation).")


@register(
    "ablation",
    schema=[("layer", pa.int16()), ("head", pa.int16()), ("effect", pa.float32()), ("baseline", pa.float32()),
            ("method", pa.string())],
    check=_check_ablation,
    defaults={"method": "zero", "batch_size": 16},
    reads_target=True,
)
def ablation_rows(context: Context, item: Item, forward: Forward, params: dict) -> dict[str, list]:
    """Per layer × head: P(target) at the answer position with that head ablated minus P(target)
    of the clean run (`ablation_sweep`; "mean" uses mechvis's built-in reference texts)."""

    model = context.model
    reference = context.once("reference", lambda: reference_runs(model)) if params["method"] == "mean" else None
    tokens = forward.run.tokens[: forward.answer_position + 1]
    sweep = ablation_sweep(model, tokens, target_probability(model, item.target), method=params["method"],
                           reference=reference, batch_size=params["batch_size"])
    n_layers, n_heads = sweep.effect.shape
    return {
        "layer": torch.arange(n_layers).repeat_interleave(n_heads).tolist(),
        "head": torch.arange(n_heads).repeat(n_layers).tolist(), "effect": sweep.effect.flatten().tolist(),
        "baseline": [sweep.baseline] * (n_layers * n_heads), "method": [params["method"]] * (n_layers * n_heads),
    }


# --- the shared forward pass --------------------------------------------------------------------

def forward_pass(model: "TransformerBridge", item: Item, hooks: list[str]) -> Forward:
    """Run `item` once (teacher-forcing its continuation or generating, if it asks) caching `hooks`."""

    names = sorted(set(hooks))
    names_filter = names if names else (lambda name: False)
    prompt = item.model_prompt
    if item.generates:
        options = dict(item.generate)  # max_new_tokens and the sampling settings (dataset.GENERATE_FIELDS)
        sampling = mechvis.SamplingSettings(**{key: options.pop(key) for key in ("temperature", "top_k", "top_p", "seed") if key in options})
        trace = mechvis.generate(model, prompt, chat=item.chat, image=item.image, names_filter=names_filter, sampling=sampling, **options)
        return Forward(trace.run, trace.prompt_length - 1, trace)
    if item.continuation is not None:
        if item.image is not None:
            raise InvalidArgumentError(f"Item {item.id!r}: a continuation with an image is not supported; use 'generate'.")
        trace = mechvis.teacher_force(model, prompt, item.continuation, chat=item.chat, names_filter=names_filter)
        return Forward(trace.run, trace.prompt_length - 1, trace)
    run = mechvis.run(model, prompt, chat=item.chat, image=item.image, names_filter=names_filter)
    return Forward(run, len(run.tokens) - 1)


def sweep_hooks(model: "TransformerBridge", analyses: dict[str, dict]) -> list[str]:
    """The union of the hooks the chosen analyses read (what each item's forward pass caches)."""
    return sorted({hook for name, params in analyses.items() for hook in ANALYSES[name].hooks(model, params)})


def _forward_ids(model: "TransformerBridge", item: Item) -> list[int] | None:
    """The token ids `forward_pass` feeds the model for a text item (prompt, plus a teacher-forced
    continuation); None for items that generate or carry an image (never batched) or that cannot
    be encoded."""

    if item.generates or item.image is not None:
        return None
    try:
        ids = list(encode(model, item.model_prompt, chat=item.chat).token_ids)
    except MechvisError:
        return None  # not batched: the item's own forward pass raises, naming its line (`analyse_item`)
    if item.continuation is not None:
        ids += model.hf_tokenizer.encode(item.continuation, add_special_tokens=False)
    return ids


class BatchedForwards:
    """Items of equal token length share one batched forward pass; each item then runs its usual
    single-item code (`mechvis.run` / `teacher_force`), whose `run_with_cache` call is answered
    from the batch: that item's row of the logits and of every cached activation.

    Exact by construction for decoder-only text models: equal lengths need no padding, so no
    attention mask or position ids change; each row of a batched forward is the same arithmetic
    as the single forward (float reductions may differ in the last bits, ~1e-7). A call whose
    tokens or hooks differ from the batch's (or that passes extra inputs) runs the model as usual.
    Groups of one item are not batched. `max_batch` bounds the activations held at once.
    """

    def __init__(self, model: "TransformerBridge", items: "list[Item]", hooks: list[str], *, max_batch: int = 8):
        self.model, self.hooks, self.answers = model, sorted(set(hooks)), {}
        groups: dict[int, list[tuple[int, ...]]] = {}
        for item in items:
            ids = _forward_ids(model, item)
            if ids is not None and 0 < len(ids) <= model.cfg.n_ctx:
                groups.setdefault(len(ids), []).append(tuple(ids))
        self.batches = [group[i : i + max_batch] for group in groups.values() if len(group) > 1
                        for i in range(0, len(group), max_batch) if len(group[i : i + max_batch]) > 1]

    def __enter__(self) -> "BatchedForwards":
        model, real = self.model, self.model.run_with_cache
        names_filter = self.hooks if self.hooks else (lambda name: False)
        pending = {ids for batch in self.batches for ids in batch}

        def compute(ids: tuple[int, ...]) -> None:
            batch = next(batch for batch in self.batches if ids in batch)
            tokens = torch.tensor(batch, dtype=torch.long, device=model.cfg.device)
            with torch.no_grad():
                logits, cache = real(tokens, names_filter=names_filter)
            for row, row_ids in enumerate(batch):
                if row_ids in pending:  # a duplicate prompt is answered once, then runs as usual
                    pending.discard(row_ids)
                    values = {name: value[row : row + 1] for name, value in cache.cache_dict.items()}
                    self.answers[row_ids] = (logits[row : row + 1], type(cache)(values, cache.model, has_batch_dim=True))

        def replay(tokens, *args, names_filter=None, **kwargs):
            key = tuple(tokens[0].tolist()) if isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and tokens.shape[0] == 1 else None
            same_hooks = isinstance(names_filter, (list, tuple)) and sorted(set(names_filter)) == self.hooks or (
                not self.hooks and callable(names_filter) and not isinstance(names_filter, (list, tuple)))
            if key is not None and not args and not kwargs and same_hooks and (key in self.answers or key in pending):
                if key not in self.answers:
                    compute(key)
                return self.answers.pop(key)
            return real(tokens, *args, names_filter=names_filter, **kwargs)

        model.run_with_cache = replay  # an instance attribute shadowing the bound method
        return self

    def __exit__(self, *exc) -> None:
        self.model.__dict__.pop("run_with_cache", None)
        self.answers.clear()


def analyse_item(context: Context, item: Item, analyses: dict[str, dict]) -> dict[str, dict[str, list]]:
    """{analysis: columns} of one item, from one shared forward pass.

    Raises:
        MechvisError: of the same class as the analysis raised, its message prefixed with the
            item's line/row and id (e.g. a prompt longer than the model's context)."""
    try:
        return _analyse_item(context, item, analyses)
    except MechvisError as error:
        if str(error).startswith(f"line/row {item.line} "):
            raise
        raise type(error)(f"line/row {item.line} (id {item.id!r}): {error}") from error


def _analyse_item(context: Context, item: Item, analyses: dict[str, dict]) -> dict[str, dict[str, list]]:
    hooks = sweep_hooks(context.model, analyses)
    forward = forward_pass(context.model, item, hooks)
    tables = {}
    for name, params in analyses.items():
        columns = ANALYSES[name].compute(context, item, forward, params)
        n = len(next(iter(columns.values())))
        tables[name] = {"item_id": [item.id] * n, "condition": [item.condition] * n, "pair": [item.pair] * n, **columns}
    return tables
