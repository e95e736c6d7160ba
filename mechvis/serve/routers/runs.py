"""GET /api/runs/{id} and the tabs' data. Every number comes from a `mechvis.analysis` function;
attention travels one layer at a time as binary uint8."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import threading
from typing import Literal

import torch
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mechvis.analysis import (
    activation_norms,
    activation_statistics,
    attention_patterns,
    direct_logit_attribution,
    head_entropy,
    hidden_state_projection,
    layer_similarity,
    logit_lens,
    rollout_rows,
    token_signals,
)
from mechvis.analysis.vision import hotspots, image_attention, vision_rollout
from mechvis.errors import MechvisError
from mechvis.interventions import ablate_heads, ablation_sweep, intervene, reference_tokens
from mechvis.results import jsonable
from mechvis.serve.runs import mean_reference as _mean_reference
from mechvis.serve.state import ServerState, get_state
from mechvis.serve.store import StoredRun
from mechvis.studies.attribution import gradient_x_input, occlusion
from mechvis.viz.views import attention_heads_view

router = APIRouter(prefix="/api/runs", tags=["runs"])
RunId = Path(pattern=r"^[0-9a-f]{12}$")


def stored_run(run_id: str, state: ServerState) -> StoredRun:
    stored = state.store.get(run_id)
    if stored is None:
        raise HTTPException(404, "No such run (it may have been evicted from the store); generate again.")
    return stored


def _clean(values) -> list:
    """Floats for JSON: NaN/inf become None."""
    return [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in values]


def _memo(stored: StoredRun, key, compute):
    if key not in stored.extras:
        stored.extras[key] = compute()
    return stored.extras[key]


@router.get("/{run_id}")
def get_run(run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    """Tokens with their segments and signals (each position's next-token distribution)."""
    stored = stored_run(run_id, state)
    trace, model = stored.trace, state.model
    run = trace.run
    special = set(model.hf_tokenizer.all_special_ids)
    kinds = [""] * len(run.str_tokens)
    for span in run.segments.spans:
        for position in range(span.start, span.stop):
            kinds[position] = span.kind
    grid = run.segments.image_grid
    signals = stored.signals
    ids = set(signals.top_ids.flatten().tolist()) | {i for e in stored.events for i in e["top_ids"]}
    decode = model.hf_tokenizer.decode
    return {
        "texts": {int(i): decode([int(i)]) for i in sorted(ids)},
        "id": stored.id,
        "request": stored.request,
        "prompt_length": trace.prompt_length,
        "tokens": [{"id": int(i), "text": text, "segment": kind, "special": int(i) in special}
                   for i, text, kind in zip(run.tokens.tolist(), run.str_tokens, kinds)],
        "spans": [{"kind": s.kind, "start": s.start, "stop": s.stop} for s in run.segments.spans],
        "sinks": list(run.segments.sink_positions),
        "image_grid": None if grid is None else {"rows": grid.rows, "cols": grid.cols} if hasattr(grid, "rows") else None,
        "generated_text": trace.generated_text,
        "events": stored.events,
        "sampled_not_argmax": [int(e["rank"] != 0) for e in stored.events],
        "signals": signals.to_dict({"entropy": "entropy", "varentropy": "varentropy", "top1": "top1_prob", "margin": "margin",
                                    "surprisal": "surprisal", "top_ids": "top_ids", "top_probs": "top_probs"}, strict=True),
        "repetition": stored.extras.get("repetition", {}),
        "timing": stored.timing,
        "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
    }


@router.get("/{run_id}/attention/{layer}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def attention_layer(run_id: str = RunId, layer: int = Path(ge=0, le=1023), state: ServerState = Depends(get_state)) -> Response:
    """Every head's pattern at `layer` as uint8 (value · 255, rounded), heads × query × key, row-major;
    the shape is in the X-Shape header."""
    stored = stored_run(run_id, state)

    if layer >= state.model.cfg.n_layers:
        raise HTTPException(422, f"layer must be < {state.model.cfg.n_layers}.")
    pattern = attention_patterns(stored.trace.run, layers=[layer])[0]
    data = (pattern.float() * 255).round_().clamp_(0, 255).to(torch.uint8).contiguous()
    return Response(data.numpy().tobytes(), media_type="application/octet-stream",
                    headers={"X-Shape": ",".join(map(str, data.shape))})


@router.get("/{run_id}/heads")
def heads(run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    """Head entropy (layer × head mean normalised entropy), sink mass and each head's class."""

    stored = stored_run(run_id, state)
    result = _memo(stored, "heads", lambda: head_entropy(
        stored.trace.run, sink_positions=stored.trace.run.segments.sink_positions or (0,)))
    return {
        **result.to_dict({"layers": "layers", "entropy": "mean_normalised"}, strict=True),
        "entropy_nats": jsonable(result.entropy.nanmean(-1), strict=True),
        **result.to_dict({"sink_mass": "mean_sink_mass"}, strict=True),
        "classes": [{"layer": l, "head": h, "kind": k} for l, h, k in result.classify()],
        **result.to_dict({"row_entropy": "entropy", "row_sink_mass": "sink_mass"}, strict=True),
    }


@router.get("/{run_id}/similarity")
def similarity(run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    stored = stored_run(run_id, state)
    result = _memo(stored, "similarity", lambda: layer_similarity(stored.trace.run))
    return result.to_dict({"labels": "layer_labels", "cosine": "cosine"}, strict=True)


@router.get("/{run_id}/lens")
def lens(run_id: str = RunId, position: int | None = Query(None, ge=0, le=1_000_000),
         state: ServerState = Depends(get_state)) -> dict:
    """Logit lens at every position (or only at `position`: the inspector's rows, ~N times
    cheaper than the whole run's): top-1 token and its probability per layer, the top-3, KL from
    the final layer (nats); arrays are layer × position (× 3)."""

    stored = stored_run(run_id, state)
    cache = stored.trace.run.cache
    if position is not None:
        if position >= len(stored.trace.run.tokens):
            raise HTTPException(422, f"position must be < {len(stored.trace.run.tokens)}.")
        if "lens" not in stored.extras:  # the whole run's lens, once tab 6 has asked for it, holds this row
            result = _memo(stored, f"lens/{position}", lambda: logit_lens(cache, positions=[position], k=3))
            return _lens_payload(result)
        return _lens_payload(stored.extras["lens"], position)
    return _lens_payload(_memo(stored, "lens", lambda: logit_lens(cache, k=3)))


def _lens_payload(result, position: int | None = None) -> dict:
    """A `LogitLens` as JSON (layer × position arrays), or only its column at `position`."""
    if position is not None:
        index = result.positions.index(position)
        columns = slice(index, index + 1)
        result = dataclasses.replace(
            result, positions=[position], top_tokens=[layer[columns] for layer in result.top_tokens], target_ids=result.target_ids[columns],
            **{name: getattr(result, name)[:, columns] for name in
               ("top_ids", "top_probs", "target_probs", "target_ranks", "entropy", "kl_from_final", "max_probs")})
    return result.to_dict({"labels": "layer_labels", "positions": "positions", "top_tokens": "top_tokens", "top_probs": "top_probs",
                           "kl": "kl_from_final", "entropy": "entropy"}, decimals=4)


@router.get("/{run_id}/dla")
def dla(run_id: str = RunId, position: int = Query(ge=1, le=1_000_000), per: Literal["head", "layer"] = "layer",
        state: ServerState = Depends(get_state)) -> dict:
    """Direct logit attribution of the token at `position` (predicted at position − 1)."""

    stored = stored_run(run_id, state)
    tokens = stored.trace.run.tokens
    if position >= len(tokens):
        raise HTTPException(422, f"position must be < {len(tokens)}.")
    result = direct_logit_attribution(stored.trace.run, answer=int(tokens[position]),
                                      position=position - 1, heads=per == "head")
    return result.to_dict({"labels": "labels", "contributions": "contributions", "bias": "unembed_bias", "model_value": "model_value"})


@router.get("/{run_id}/distribution/{step}")
def distribution(run_id: str = RunId, step: int = Path(ge=0, le=100_000), state: ServerState = Depends(get_state)) -> dict:
    """The top of generated step `step`'s distribution before (raw, temperature 1) and after
    temperature and truncation (what the token was sampled from)."""
    stored = stored_run(run_id, state)
    top = stored.step_top
    if not top or step >= len(top["raw_ids"]):
        raise HTTPException(422, "step is not a generated step of this run.")
    decode = state.model.hf_tokenizer.decode
    return {
        "raw": [{"id": i, "text": decode([i]), "p": p} for i, p in zip(top["raw_ids"][step].tolist(), top["raw_probs"][step].tolist())],
        "sampled": [{"id": i, "text": decode([i]), "p": p} for i, p in zip(top["sampled_ids"][step].tolist(), top["sampled_probs"][step].tolist())],
        "support": int(top["support"][step]),
        "temperature": float(stored.trace.step_temperatures[step]),
        "token_id": stored.trace.generated_ids[step],
    }


@router.get("/{run_id}/projection")
def projection(run_id: str = RunId, layer: int = Query(-1, ge=-1, le=1023), dims: int = Query(2, ge=2, le=3),
               state: ServerState = Depends(get_state)) -> dict:
    """PCA of the hidden states after `layer` (−1: the token embeddings) at every position."""

    stored = stored_run(run_id, state)
    if layer >= state.model.cfg.n_layers:
        raise HTTPException(422, f"layer must be < {state.model.cfg.n_layers}.")
    run = stored.trace.run
    result = hidden_state_projection(run, labels=run.str_tokens, layer=None if layer < 0 else layer,
                                     n_components=dims)
    return result.to_dict({"coordinates": "coordinates", "labels": "labels", "explained": "explained_variance_ratio"})


@router.get("/{run_id}/activations")
def activations(run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    """Per layer: distribution statistics of MLP and attention outputs, residual norms."""

    stored = stored_run(run_id, state)
    cache, model = stored.trace.run.cache, state.model

    def compute():
        out = {}
        for kind in ("mlp_post", "attn_out"):
            stats = activation_statistics(cache, kind=kind)
            out[kind] = stats.to_dict({"mean": "mean", "std": "std", "kurtosis": "kurtosis", "percentiles": "percentiles",
                                       "levels": "percentile_levels"})
        out["resid_norms"] = activation_norms(cache, kind="resid_post").to_dict(("norms",))["norms"]
        return out

    return _memo(stored, "activations", compute)


@router.get("/{run_id}/rollout")
def rollout_row(run_id: str = RunId, position: int = Query(ge=0, le=1_000_000), state: ServerState = Depends(get_state)) -> dict:
    """Attention rollout (Abnar & Zuidema 2020): the row of the query at `position`
    (`rollout_rows`: k·N² per layer, not the whole matrix's N³)."""

    stored = stored_run(run_id, state)
    n = len(stored.trace.run.tokens)
    if position >= n:
        raise HTTPException(422, f"position must be < {n}.")
    result = _memo(stored, f"rollout/{position}", lambda: rollout_rows(stored.trace.run, queries=[position]))
    return {"row": jsonable(result.rows[0])}


class AttributionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=1, le=1_000_000)
    method: Literal["gradient_x_input", "occlusion"] = "gradient_x_input"


@router.post("/{run_id}/attribution")
def attribution(body: AttributionRequest, run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    """Input attribution toward the token at `position` (its logit at position − 1), on demand."""

    stored = stored_run(run_id, state)
    tokens = stored.trace.run.tokens
    if body.position >= len(tokens):
        raise HTTPException(422, f"position must be < {len(tokens)}.")
    method = gradient_x_input if body.method == "gradient_x_input" else occlusion
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    try:
        result = method(state.model, tokens[: body.position], int(tokens[body.position]), position=body.position - 1)
    finally:
        state.generation_lock.release()
    return result.to_dict(("method", "scores", "target_value", "score"))


class AblationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: list[tuple[int, int]] = Field(min_length=1, max_length=4096)
    method: Literal["zero", "mean", "resample"] = "zero"


@router.post("/{run_id}/ablation")
def ablation(body: AblationRequest, run_id: str = RunId, state: ServerState = Depends(get_state)) -> dict:
    """Ablate the heads on the run's whole sequence; Δp of each token (p under the ablation − p
    of the original run, from the model's next-token distributions)."""

    stored = stored_run(run_id, state)
    model, tokens = state.model, stored.trace.run.tokens
    reference = None
    if body.method == "mean":
        reference = _mean_reference(state)
    elif body.method == "resample":
        reference = _memo(stored, "resample-reference", lambda: reference_tokens(model, len(tokens)))
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    try:
        intervention = ablate_heads(model, [tuple(h) for h in body.heads], method=body.method, reference=reference)
        with torch.no_grad(), intervene(model, intervention):
            logits = model(tokens[None])[0]
    finally:
        state.generation_lock.release()
    ablated = token_signals(logits, tokens, k=1).surprisal
    original = stored.signals.surprisal
    delta = (torch.exp(-ablated) - torch.exp(-original)).tolist()
    # delta[i]: the change of p(token i+1); shift so index = the token's own position
    return {"delta_p": [None] + _clean(delta[:-1]), "description": intervention.description}


@router.get("/{run_id}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def run_image(run_id: str = RunId, state: ServerState = Depends(get_state)) -> Response:
    """The run's image (re-encoded as PNG)."""

    stored = stored_run(run_id, state)
    image = stored.extras.get("image")
    if image is None:
        raise HTTPException(404, "This run has no image.")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


@router.get("/{run_id}/vision")
def vision(run_id: str = RunId, position: int = Query(ge=0, le=1_000_000), layer: int = Query(ge=0, le=1023),
           state: ServerState = Depends(get_state)) -> dict:
    """Where the token at `position` looks in the image at `layer` (`image_attention`: each head's
    map renormalised over the image, the image mass, region metrics) and the hotspots of the
    head-mean map."""

    stored = stored_run(run_id, state)
    run = stored.trace.run
    grid = run.segments.image_grid
    if grid is None:
        raise HTTPException(422, "This run has no image grid.")
    if position >= len(run.tokens) or layer >= state.model.cfg.n_layers:
        raise HTTPException(422, "position or layer out of range.")
    result = image_attention(run, grid=grid, query_positions=[position], layers=[layer])
    maps = result.maps[0, :, 0].float()  # head × cell
    mean_map = maps.mean(0)
    metrics = result.metrics
    return {
        "rows": grid.rows, "cols": grid.cols,
        "maps": maps.tolist(), "mean_map": mean_map.tolist(),
        "image_mass": result.image_mass[0, :, 0].tolist(),
        "metrics": {name: getattr(metrics, name)[0, :, 0].tolist() for name in
                    ("normalised_entropy", "gini", "k90_fraction", "peak_to_mean", "spatial_variance")},
        "hotspots": [{"cells": h.cells, "mass": h.mass, "centre": list(h.centre)} for h in hotspots(mean_map, grid)],
    }


@router.get("/{run_id}/vision-rollout")
def vision_rollout_row(run_id: str = RunId, position: int = Query(ge=0, le=1_000_000),
                       state: ServerState = Depends(get_state)) -> dict:
    """Vision rollout (`mechvis.analysis.vision.vision_rollout`) of the token at `position`: its
    language-model rollout into the image tokens, carried through the vision encoder onto the
    image patches (`map`, row-major over `patch_rows` × `patch_cols`, sums to 1), and the share of
    its rollout on the image block (`image_mass`). Computed once per run for every position."""

    stored = stored_run(run_id, state)
    run = stored.trace.run
    grid = run.segments.image_grid
    if grid is None:
        raise HTTPException(422, "This run has no image grid.")
    if position >= len(run.tokens):
        raise HTTPException(422, f"position must be < {len(run.tokens)}.")
    result = _memo(stored, "vision-rollout", lambda: vision_rollout(
        run, grid=grid, query_positions=list(range(len(run.tokens)))))
    rows, cols = result.patch_shape
    return {"patch_rows": rows, "patch_cols": cols, "map": result.maps[position].tolist(),
            "image_mass": float(result.image_mass[position]), "vision_layers": result.vision_layers}


CIRCUITSVIS_MAX_TOKENS = 256  # circuitsvis takes seconds for one 8-head 256² view (WEBAPP.md)


@router.get("/{run_id}/views/{name}", response_class=Response, responses={200: {"content": {"application/json": {}}}})
def circuitsvis_view(run_id: str = RunId, name: Literal["attention-heads", "topk-tokens"] = Path(),
                     layer: int = Query(0, ge=0, le=1023), state: ServerState = Depends(get_state)) -> Response:
    """A circuitsvis view of the run, as `mechvis.viz.views` builds it for the report
    ({"component", "title", "props"}; the page renders it with circuitsvis' bundle served from its
    wheel): "attention-heads", every head of `layer` (AttentionHeads; at most 256 tokens), or
    "topk-tokens", each position's top-10 next tokens and the actual token's rank (TokenLogProbs)."""

    stored = stored_run(run_id, state)
    run = stored.trace.run
    if name == "topk-tokens":
        view = stored.extras["topk-view"]
    else:
        if layer >= state.model.cfg.n_layers:
            raise HTTPException(422, f"layer must be < {state.model.cfg.n_layers}.")
        if len(run.tokens) > CIRCUITSVIS_MAX_TOKENS:
            raise HTTPException(422, f"circuitsvis draws at most {CIRCUITSVIS_MAX_TOKENS} tokens in reasonable time; "
                                     f"this run has {len(run.tokens)} (tabs 1 and 2 draw any length).")
        view = attention_heads_view(run, layer)
    body = f'{{"component":{json.dumps(view.component)},"title":{json.dumps(view.title)},"props":{view.props_json()}}}'
    return Response(body, media_type="application/json")


class SweepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=1, le=1_000_000)
    method: Literal["zero", "mean", "resample"] = "zero"


class _Cancelled(Exception):
    pass


@router.post("/{run_id}/sweep", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, 409: {"description": "busy"}})
async def sweep(body: SweepRequest, run_id: str = RunId, state: ServerState = Depends(get_state)):
    """Ablate every head on its own (`mechvis.interventions.ablation_sweep`) and measure the
    probability of the token at `position` (predicted at position − 1), streamed as `progress`
    events (batches done / total), then `result` (effect layer × head, baseline) or `error`.
    Holds the model's lock; a client that goes away stops the sweep at the next batch."""


    stored = stored_run(run_id, state)
    model, tokens = state.model, stored.trace.run.tokens
    if body.position >= len(tokens):
        raise HTTPException(422, f"position must be < {len(tokens)}.")
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    batch_size = 16
    total = 1 + math.ceil(model.cfg.n_layers * model.cfg.n_heads / batch_size)
    sequence = tokens[: body.position + 1]
    target = int(tokens[body.position])

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody listens
            pass

    def work() -> None:
        done = 0

        def metric(logits):
            nonlocal done
            if cancel.is_set():
                raise _Cancelled
            done += 1
            put(("progress", {"done": done, "total": total}))
            return logits[:, -2].float().softmax(-1)[:, target]

        try:
            reference = None
            if body.method == "mean":
                reference = _mean_reference(state)
            elif body.method == "resample":
                reference = reference_tokens(model, len(sequence))
            result = ablation_sweep(model, sequence, metric, method=body.method, reference=reference, batch_size=batch_size)
            put(("result", {"effect": result.effect.tolist(), "baseline": result.baseline, "method": result.method,
                            "top": [list(t) for t in result.top(10)]}))
        except _Cancelled:
            put(("error", {"message": "cancelled"}))
        except MechvisError as error:
            put(("error", {"message": str(error)}))
        finally:
            state.generation_lock.release()
            put(None)

    threading.Thread(target=work, name=f"sweep-{run_id}", daemon=True).start()

    async def events():
        try:
            while (item := await queue.get()) is not None:
                yield f"event: {item[0]}\ndata: {json.dumps(item[1])}\n\n"
        finally:
            cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream")
