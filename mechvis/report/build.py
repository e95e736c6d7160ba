"""Compute everything a report shows, once: the same results feed the HTML and the JSON export."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mechvis._validation import check_layers, with_model
from mechvis.analysis import (
    activation_norms,
    direct_logit_attribution,
    head_entropy,
    hidden_state_projection,
    high_entropy_positions,
    layer_similarity,
    logit_lens,
    rollout,
    rollout_rows,
    token_signals,
)
from mechvis.analysis.activations import ActivationNorms
from mechvis.analysis.attention import HeadEntropy, Rollout, RolloutRows
from mechvis.analysis.crossmodal import CrossModal, cross_modal
from mechvis.analysis.dynamics import ImageDynamics, image_dynamics
from mechvis.analysis.geometry import MapGeometry, map_geometry
from mechvis.analysis.information import RegionTokenInformation, grid_regions, region_token_information
from mechvis.analysis.lens import LogitLens
from mechvis.analysis.projection import Projection
from mechvis.analysis.repetition import loop_onset, repetition_features, seed_score, seq_rep_n
from mechvis.analysis.residual import LayerSimilarity, LogitAttribution
from mechvis.analysis.tokens import HighEntropyPositions, TokenSignals
from mechvis.analysis.vision import (
    HeadClusters,
    ImageAttention,
    VisionRollout,
    cluster_heads,
    hotspots,
    image_attention,
    vision_rollout,
    vision_rollout_hooks,
)
from mechvis.errors import InvalidArgumentError, MissingActivationsError, UnsupportedArchitectureError
from mechvis.generation import SamplingSettings, Trace, generate
from mechvis.generation.monitor import RepetitionFeatures, RepetitionMonitor, find_induction_heads, rep_labels
from mechvis.images import encode_with_image, load_image, with_text_appended
from mechvis.interventions import AblationSweep, ablation_sweep, target_probability
from mechvis.models.architecture import ArchitectureSummary, inspect_model
from mechvis.results import jsonable
from mechvis.studies import longcontext
from mechvis.studies.longcontext import (
    LongContextAnalysis,
    LongOptions,
    LongReads,
    analyse_long,
    check_long_context_support,
    estimated_cache_bytes,
)
from mechvis.text import encode
from mechvis.viz.views import rounded

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

SCHEMA = "mechvis.report/2"  # /2: rollout as rows for chosen queries; the N × N matrix only on request
ROLLOUT_QUERIES = 64  # default cap on the generated tokens' rollout rows (plus the last prompt token's)


@dataclass
class RepetitionResult:
    """Repetition signals of the generated tokens (index 0 = the first generated token)."""

    labels: torch.Tensor
    loop_onset: int | None  # index into the generated tokens
    alarm: int | None  # the monitor's first CUSUM alarm, same indexing
    seq_rep_4: float
    monitor_probability: torch.Tensor
    seed_score: torch.Tensor
    features: RepetitionFeatures


@dataclass
class VisionResult:
    """Where the generated tokens look in the image."""

    image: object  # the PIL image
    attention: "ImageAttention"
    mean_map: torch.Tensor  # over layers, heads and queries; sums to 1 over the grid
    hotspots: list
    clusters: "HeadClusters"  # all layers × heads, on their mean maps; k by silhouette
    rollout: "VisionRollout | None"
    geometry: "MapGeometry | None" = None  # of the mean map
    dynamics: "ImageDynamics | None" = None  # per generated token (None without generated tokens)
    information: "RegionTokenInformation | None" = None  # I(quadrant; generated token)
    cross_modal: "CrossModal | None" = None  # None when the cache lacks the residual stream


@dataclass
class ReportData:
    """Every analysis result of one report."""

    model_summary: ArchitectureSummary
    prompt: str
    chat: bool
    trace: Trace
    attention_layers: list[int]
    signals: TokenSignals
    high_entropy: HighEntropyPositions
    lens: LogitLens
    entropy: HeadEntropy
    rollout: RolloutRows  # rows for the queries `default_rollout_queries` chose (or the caller's)
    norms: ActivationNorms
    similarity: LayerSimilarity
    attribution: LogitAttribution | None
    repetition: RepetitionResult | None
    projection: Projection
    ablation: AblationSweep | None = None
    ablation_target: str = ""
    vision: VisionResult | None = None
    rollout_matrix: Rollout | None = None  # the full N × N rollout, only with `full_rollout=True`
    notes: list[str] = field(default_factory=list)  # e.g. that the long-context path computed the results
    # the long-context path's rank of each next token (`LongContextAnalysis.next_ranks`): with
    # `signals`, the top-k view without the run's (pos, vocab) logits, which that path does not keep
    next_ranks: torch.Tensor | None = None


def default_rollout_queries(prompt_length: int, n_tokens: int, cap: int = ROLLOUT_QUERIES) -> list[int]:
    """The query rows a report's rollout keeps: the last prompt token and the generated tokens, at
    most `cap` of these (beyond that, evenly spaced over them, the first and last kept).

    Rows instead of the N × N matrix keep the report's size linear in N (at 8,192 tokens the
    matrix alone is 67 M numbers).

    Raises:
        InvalidArgumentError: a negative cap."""
    if cap < 0:
        raise InvalidArgumentError(f"rollout_queries must be at least 0 (generated rows); got {cap}.")
    last_prompt = max(0, min(prompt_length, n_tokens) - 1)
    generated = list(range(last_prompt + 1, n_tokens))
    if len(generated) > cap:
        picks = torch.linspace(0, len(generated) - 1, cap).round().long().unique().tolist() if cap else []
        generated = [generated[i] for i in picks]
    return [last_prompt] + generated


def default_attention_layers(n_layers: int) -> list[int]:
    """Four layers spread over the depth: first, one third, two thirds, last."""
    return sorted({0, n_layers // 3, (2 * n_layers) // 3, n_layers - 1})


def build_report_data(
    model: "TransformerBridge",
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    layers: Sequence[int] | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    lens_positions: int = 16,
    ablation: bool = False,
    image: object | None = None,
    rollout_queries: Sequence[int] | int = ROLLOUT_QUERIES,
    full_rollout: bool = False,
    trace: Trace | None = None,
) -> ReportData:
    """Generate from `prompt` (with `image` for a vision-language model) and run every analysis of
    the report on the trace. With `trace` (full-vocabulary `run.logits` and a cache of every
    hook, e.g. `mechvis serve`'s teacher-forced pass over a run's tokens), analyse it instead of
    generating: `prompt` and `chat` are then only recorded, `max_new_tokens`, `temperature` and
    `seed` unused.

    The rollout is kept as rows: `rollout_queries` is either the query positions (negative counts
    from the end) or the cap of `default_rollout_queries`; `full_rollout` also computes the N × N
    matrix (`ReportData.rollout_matrix`, exported as `rollout.matrix`).

    Raises:
        InvalidArgumentError: a layer, query position or cap out of range."""
    with tqdm(total=4, desc="report", unit="stage") as stages:  # closed on errors too: a message never shares its line
        return _build_report_data(stages, model, prompt, chat, max_new_tokens, layers, temperature, seed, lens_positions, ablation, image, rollout_queries, full_rollout, trace)


def _build_report_data(stages, model, prompt, chat, max_new_tokens, layers, temperature, seed, lens_positions, ablation, image, rollout_queries, full_rollout, trace) -> ReportData:
    attention_layers = check_layers(model, layers) if layers else default_attention_layers(model.cfg.n_layers)
    stages.set_postfix_str("generating")
    long_context = trace is None and _needs_long_context(model, prompt, chat, max_new_tokens, image)
    if long_context and full_rollout:
        raise InvalidArgumentError(
            "full_rollout needs the whole cache, which would not fit in memory for this input (the long-context "
            "path keeps rollout rows only); leave full_rollout off or shorten the input."
        )
    if trace is None:
        # On the long path no teacher-forced pass: analyse_long recomputes what the report needs in bounded memory.
        trace = generate(model, prompt, chat=chat, max_new_tokens=max_new_tokens,
                         sampling=SamplingSettings(temperature=temperature, seed=seed), image=image, analysis_pass=not long_context)
    run = trace.run
    stages.update()
    if long_context:
        stages.close()
        return _long_context_report_data(model, trace, prompt, chat, attention_layers, lens_positions,
                                         _rollout_queries(rollout_queries, trace.prompt_length, len(run.tokens)), image)
    stages.set_postfix_str("token and lens analyses")
    n = len(run.tokens)
    signals = token_signals(run.logits, run.tokens)
    high = high_entropy_positions(run, logits=run.logits[:-1] if n > 1 else run.logits, n=min(10, max(1, n - 1)), k=5,
                                  own_logits=True)  # the model's own logits, not the centred ones
    lens = logit_lens(run, positions=list(range(max(0, n - lens_positions), n)))
    stages.update()
    stages.set_postfix_str("attention, residual and activation analyses")
    entropy = head_entropy(run, sink_positions=run.segments.sink_positions)
    rolled = rollout_rows(run, queries=_rollout_queries(rollout_queries, trace.prompt_length, n))
    rollout_matrix = rollout(run) if full_rollout else None
    norms = activation_norms(run, kind="resid_post")
    similarity = layer_similarity(run)
    attribution = None
    if trace.generated_ids:
        last = trace.prompt_length + len(trace.generated_ids) - 1
        runner_up = run.logits[last - 1].topk(2).indices.tolist()
        answer = trace.generated_ids[-1]
        counterfactual = runner_up[1] if runner_up[0] == answer else runner_up[0]
        attribution = direct_logit_attribution(run, answer=answer, counterfactual=counterfactual, position=last - 1)
    projection = hidden_state_projection(run, labels=run.str_tokens, layer=model.cfg.n_layers // 2,
                                         positions=list(range(1, n)) if n > 2 else None)
    stages.update()
    stages.set_postfix_str("repetition signals")
    repetition = None
    if len(trace.generated_ids) >= 2:
        induction = find_induction_heads(model)
        features = repetition_features(trace, induction=induction)
        monitor = RepetitionMonitor.load()
        probability = monitor.score(features)
        labels = rep_labels(trace.generated_ids)
        repetition = RepetitionResult(labels, loop_onset(labels), monitor.first_alarm(probability),
                                      seq_rep_n(trace.generated_ids), probability, seed_score(trace).score, features)
    stages.update()
    stages.close()
    sweep, target_label = None, ""
    if ablation and trace.generated_ids:
        last = trace.prompt_length + len(trace.generated_ids) - 1
        target_label = repr(model.hf_tokenizer.decode([trace.generated_ids[-1]]))
        sweep = ablation_sweep(model, run.tokens[: last + 1], target_probability(model, trace.generated_ids[-1], position=last - 1))
    vision = _vision_result(model, trace, image) if trace.run.segments.image_grid is not None else None
    return ReportData(inspect_model(model), prompt, chat, trace, attention_layers, signals, high, lens, entropy, rolled,
                      norms, similarity, attribution, repetition, projection, sweep, target_label, vision, rollout_matrix)


def _rollout_queries(rollout_queries: Sequence[int] | int, prompt_length: int, n_tokens: int) -> list[int]:
    """The rollout rows a report keeps: the caller's positions, or `default_rollout_queries` capped."""
    if isinstance(rollout_queries, int):
        return default_rollout_queries(prompt_length, n_tokens, rollout_queries)
    return list(rollout_queries)


def _needs_long_context(model: "TransformerBridge", prompt: str, chat: bool, max_new_tokens: int, image: object | None = None) -> bool:
    """Whether the full cache of prompt (image tokens included) + generated tokens would not fit in
    memory (see `mechvis.studies.longcontext.needs_long_context`), for a model whose attention
    `analyse_long` supports. For a model it does not (its `UnsupportedArchitectureError`, e.g.
    attention without a rotary bridge), the report keeps the cache path and logs why."""


    encoded = encode_with_image(model, prompt, image, chat=chat)[0] if image is not None else encode(model, prompt, chat=chat)
    if not longcontext.needs_long_context(model, len(encoded.token_ids) + max_new_tokens):  # looked up at call time (tests replace it)
        return False
    try:
        check_long_context_support(model)
    except UnsupportedArchitectureError as error:
        logging.getLogger("mechvis.report").warning("A full cache of this input may not fit in memory, but %s The report "
                                                    "uses the full cache.", error)
        return False
    return True


def _long_context_report_data(
    model: "TransformerBridge", trace: Trace, prompt: str, chat: bool, attention_layers: list[int], lens_positions: int,
    queries: list[int], image: object | None = None,
) -> ReportData:
    """The report's analyses by `analyse_long` (no cache): rollout as rows for `queries` (as the
    cached path keeps them), no ablation sweep. With an image, the image metrics too (from the
    image rows, rollout rows and vision-tower patterns analyse_long keeps), equal to the cached path's."""


    run = trace.run
    n = len(run.tokens)
    note = (f"Long context: a full cache of {n} tokens would take ~{estimated_cache_bytes(model, n) / 1e9:.1f} GB, more "
            "than half the memory available, so every metric was computed by mechvis.analysis.analyse_long (blocked "
            "attention, no cache); rollout is given as rows for chosen queries.")
    logging.getLogger("mechvis.report").warning(note)
    tqdm.write(note)
    attribution, repetition_args = None, {}
    if trace.generated_ids:
        last = trace.prompt_length + len(trace.generated_ids) - 1
        # the logits that predicted the last token (the decoding step's; the run keeps no logits here)
        predicting = trace.step_logits[-1] if trace.step_logits.shape[-1] else run.logits[last - 1]
        runner_up = predicting.topk(2).indices.tolist()
        answer = trace.generated_ids[-1]
        attribution = (answer, runner_up[1] if runner_up[0] == answer else runner_up[0])
    if len(trace.generated_ids) >= 2:
        repetition_args = dict(prompt_length=trace.prompt_length, induction=find_induction_heads(model))
    middle = model.cfg.n_layers // 2
    grid = run.segments.image_grid
    image_reads, vision_queries, forward_inputs = {}, [], None
    if image is not None:
        forward_inputs = with_text_appended(encode_with_image(model, prompt, image, chat=chat)[1], len(trace.generated_ids))
    if image is not None and grid is not None:
        vision_queries = list(trace.generated_positions) or [n - 1]  # as `_vision_result`
        dynamics_queries = [position - 1 for position in trace.generated_positions]  # `image_dynamics`' rows
        image_reads = dict(image_queries=sorted(set(vision_queries) | set(dynamics_queries)), image_positions=list(grid.positions),
                           capture=[name for name in vision_rollout_hooks(model) if name in model.hook_dict])
    rollout_queries = list(dict.fromkeys(queries + vision_queries))  # the report's rows, then the vision rollout's
    reads = LongReads(queries=rollout_queries, lens_positions=list(range(max(0, n - lens_positions), n)),
                      sink_positions=run.segments.sink_positions,
                      keep_residuals=range(model.cfg.n_layers) if image_reads else [middle], **image_reads)
    options = LongOptions(attribution=attribution, attribution_position=n - 2 if trace.generated_ids else -1,
                          high_entropy=min(10, max(1, n - 1)), **repetition_args)
    result = analyse_long(model, run.tokens, reads=reads, options=options, forward_inputs=forward_inputs)
    vision = _vision_result(model, trace, image, result) if image_reads else None
    rolled = result.rollout
    if rolled is not None and len(rolled.queries) != len(queries):
        rolled = RolloutRows(rolled.rows[: len(queries)], queries, rolled.head_fusion, rolled.residual_weight, rolled.layers)
    projection = hidden_state_projection(with_model({f"blocks.{middle}.hook_resid_post": result.residuals[middle][None]}, model),
                                         labels=run.str_tokens,
                                         layer=middle, positions=list(range(1, n)) if n > 2 else None)
    repetition = None
    if result.repetition is not None:
        monitor = RepetitionMonitor.load()
        probability = monitor.score(result.repetition)
        labels = rep_labels(trace.generated_ids)
        repetition = RepetitionResult(labels, loop_onset(labels), monitor.first_alarm(probability), seq_rep_n(trace.generated_ids),
                                      probability, result.seed.score, result.repetition)
    return ReportData(inspect_model(model), prompt, chat, trace, attention_layers, result.signals, result.high_entropy, result.lens,
                      result.entropy, rolled, result.norms["resid_post"], result.similarity, result.attribution,
                      repetition, projection, vision=vision, notes=[note], next_ranks=result.next_ranks)


def _vision_result(model: "TransformerBridge", trace: Trace, image: object, long: "LongContextAnalysis | None" = None) -> VisionResult:
    """The vision section from the rows of the trace's full cache, or of `analyse_long`'s result
    (`long`: image rows, rollout rows and residual streams): the same analyses read either."""
    run = trace.run
    source = run if long is None else long
    grid = run.segments.image_grid
    queries = list(trace.generated_positions) or [len(run.tokens) - 1]
    attention = image_attention(source, grid=grid, query_positions=queries)
    unmapped = (InvalidArgumentError,) if long is None else (InvalidArgumentError, MissingActivationsError)
    try:
        rolled = vision_rollout(source, grid=grid, query_positions=queries)
    except unmapped:  # layouts whose vision rollout is not mapped yet
        rolled = None
    dynamics = image_dynamics(source, trace=trace) if trace.generated_ids else None
    try:
        crossing = cross_modal(source, grid=grid)
    except (MissingActivationsError, InvalidArgumentError):
        crossing = None
    return _vision_from(image, grid, attention, rolled, dynamics, crossing)


def _vision_from(image: object, grid, attention: ImageAttention, rolled: "VisionRollout | None", dynamics, crossing) -> VisionResult:
    """The vision result's derived parts (mean map, hotspots, clusters, geometry, information)."""

    mean_map = attention.maps.mean(dim=(0, 1, 2))
    information = None
    if dynamics is not None:
        quadrants = grid_regions(grid.rows, grid.cols, (min(2, grid.rows), min(2, grid.cols)))
        information = region_token_information(dynamics.maps.double().mean(0), regions=quadrants)
    return VisionResult(load_image(image), attention, mean_map, hotspots(mean_map, grid),
                        cluster_heads(attention.maps.mean(2)), rolled, map_geometry(mean_map, grid), dynamics, information, crossing)


def model_heads(vision: VisionResult) -> int:
    """Heads per layer of the vision result's attention (its clusters span all layers × heads)."""
    return vision.attention.image_mass.shape[1]


def report_json(data: ReportData) -> dict:
    """The report's results in the documented schema (README, "JSON export"); NaN where a value is
    undefined (written as null by `write_json`)."""
    run, trace = data.trace.run, data.trace
    kinds = [run.segments.kind_at(p) for p in range(len(run.tokens))]
    result = {
        "schema": SCHEMA,
        "notes": list(data.notes),
        "model": asdict(data.model_summary),
        "prompt": data.prompt,
        "chat": data.chat,
        "sampling": {key: value for key, value in asdict(trace.settings).items() if key != "schedule"},
        "prompt_length": trace.prompt_length,
        "generated_text": trace.generated_text,
        "tokens": [{"position": p, "id": int(t), "text": s, "segment": k}
                   for p, (t, s, k) in enumerate(zip(run.tokens.tolist(), run.str_tokens, kinds))],
        "token_signals": data.signals.to_dict(("entropy", "varentropy", "top1_prob", "margin", "surprisal"), decimals=4),
        "logit_lens": {
            **data.lens.to_dict({"layers": "layer_labels", "positions": "positions"}),
            "top1_tokens": [[row[0] for row in layer] for layer in data.lens.top_tokens],
            **data.lens.to_dict({"top1_probs": "max_probs", "entropy": "entropy", "kl_from_final": "kl_from_final",
                                 "confidence": "confidence"}, decimals=4),
        },
        "head_entropy": {
            **data.entropy.to_dict(("layers", "mean_normalised", "mean_sink_mass"), decimals=4),
            "classification": [{"layer": l, "head": h, "kind": k} for l, h, k in data.entropy.classify()],
        },
        "rollout": {**data.rollout.to_dict(("head_fusion", "residual_weight", "queries", "rows"), decimals=4),
                    "matrix": None if data.rollout_matrix is None else data.rollout_matrix.to_dict(("matrix",), decimals=3)["matrix"]},
        "activation_norms": data.norms.to_dict(("kind", "norms"), decimals=3),
        "layer_similarity": data.similarity.to_dict({"layers": "layer_labels", "cosine": "cosine"}, decimals=4),
        "attention_layers": data.attention_layers,
        "direct_logit_attribution": None,
        "repetition": None,
        "ablation": None,
        "vision": None,
    }
    if data.vision is not None:
        vision = data.vision
        result["vision"] = {
            "grid": {"rows": vision.attention.grid.rows, "cols": vision.attention.grid.cols,
                     "positions": list(vision.attention.grid.positions)},
            "image_mass_per_layer": rounded(vision.attention.mass_per_layer),
            "mean_map": rounded(vision.mean_map),
            "metrics": {name: rounded(getattr(vision.attention.metrics, name).float().mean())
                        for name in ("normalised_entropy", "gini", "k90_fraction", "peak_to_mean", "spatial_variance")},
            "hotspots": [{"cells": spot.cells, "mass": spot.mass, "centre": list(spot.centre)} for spot in vision.hotspots],
            "last_layer_head_clusters": vision.clusters.labels[-model_heads(vision):],
            "silhouette": vision.clusters.silhouette,
            "head_clusters": {"labels": vision.clusters.labels, "k": vision.clusters.n_clusters, "metric": vision.clusters.metric,
                              "silhouette_by_k": {str(k): v for k, v in vision.clusters.scores.items()}},
            "geometry": None if vision.geometry is None else {
                **vision.geometry.contour_50.to_dict({"contour_50_cells": "cells", "contour_50_fraction": "fraction"}),
                **vision.geometry.contour_90.to_dict({"contour_90_cells": "cells", "contour_90_fraction": "fraction"}),
                **vision.geometry.hull_90.to_dict({"hull_90_cells": "cells", "hull_90_fraction": "fraction"}),
            },
            "dynamics": None if vision.dynamics is None else {
                "tokens": vision.dynamics.tokens,
                "query_positions": vision.dynamics.query_positions,
                "image_mass": rounded(vision.dynamics.image_mass.mean(1)),
                "normalised_entropy": rounded(vision.dynamics.normalised_entropy.mean(1)),
                "peak_to_mean": rounded(vision.dynamics.peak_to_mean.mean(1)),
                "centre": rounded(vision.dynamics.centre.mean(1)),
                "region_mass": {name: rounded(mass.mean(1)) for name, mass in vision.dynamics.region_mass.items()},
                "region_area": vision.dynamics.region_area,
                "peaks": {name: [{"index": i, "token": t, "mass": m} for i, t, m in vision.dynamics.peaks(name, top=3)]
                          for name in vision.dynamics.region_mass},
            },
            "information": None if vision.information is None else vision.information.to_dict({
                "quadrant_token_mutual_information_nats": "mutual_information", "quadrant_entropy_nats": "region_entropy",
                "normalised": "normalised"}),
            "cross_modal": None if vision.cross_modal is None else vision.cross_modal.to_dict(
                ("layers", "alignment", "modality_gap", "centroid_distance"), decimals=4),
            "rollout_map": rounded(vision.rollout.maps.mean(0)) if vision.rollout is not None else None,
            "rollout_patch_shape": list(vision.rollout.patch_shape) if vision.rollout is not None else None,
        }
    if data.ablation is not None:
        result["ablation"] = {"method": data.ablation.method, "target": data.ablation_target,
                              "baseline": data.ablation.baseline, "effect": jsonable(data.ablation.effect, decimals=4)}
    if data.attribution is not None:
        result["direct_logit_attribution"] = {
            **data.attribution.to_dict(("position", "answer_id", "counterfactual_id", "model_value", "value_kind")),
            "top": [{"component": label, "value": value} for label, value in data.attribution.top(20)],
        }
    if data.repetition is not None:
        rep = data.repetition
        result["repetition"] = {
            "labels": rep.labels.tolist(),
            "loop_onset": rep.loop_onset,
            "monitor_alarm": rep.alarm,
            "seq_rep_4": rep.seq_rep_4,
            "monitor_probability": jsonable(rep.monitor_probability, decimals=4),
            "seed_score": jsonable(rep.seed_score, decimals=4),
            "features": {name: jsonable(rep.features[name], decimals=4) for name in rep.features.names},
        }
    return result
