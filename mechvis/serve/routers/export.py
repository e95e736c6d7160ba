"""GET /api/runs/{id}/export.json and /export.html: the current view of a run (completion or chat,
with or without an image or an ablation) as JSON, or as the offline HTML report of the same tokens."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse

from mechvis.generation import SamplingSettings
from mechvis.generation.trace import analysed_trace
from mechvis.images import encode_with_image
from mechvis.report import write_report
from mechvis.report.build import default_attention_layers
from mechvis.serve.routers.generate import GenerateRequest, request_prompt
from mechvis.serve.routers.runs import RunId, get_run, stored_run
from mechvis.serve.runs import ablated
from mechvis.serve.state import ServerState, get_state
from mechvis.text import encode

router = APIRouter(prefix="/api/runs", tags=["export"])
TABS = Literal["attention", "heads", "entropy", "similarity", "dla", "lens", "distribution", "projection", "activations",
               "entropy-curve", "confidence", "attribution", "repetition", "interventions", "vision", "rollout"]


@router.get("/{run_id}/export.json")
def export_json(
    run_id: str = RunId,
    pos: int | None = Query(None, ge=0, le=1_000_000),
    layer: int | None = Query(None, ge=0, le=1023),
    head: int | Literal["mean", "max"] | None = None,
    tab: TABS | None = None,
    state: ServerState = Depends(get_state),
) -> JSONResponse:
    """The run as JSON (request, tokens with segments, streamed events, signals, repetition), with
    the view the page shows (`view`: selected position, layer, head, tab)."""
    data = get_run(run_id, state)
    data["view"] = {"pos": pos, "layer": layer, "head": head, "tab": tab}
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="mechvis-{run_id}.json"'})


@router.get("/{run_id}/export.html", response_class=HTMLResponse)
def export_html(
    run_id: str = RunId,
    layer: int | None = Query(None, ge=0, le=1023),
    state: ServerState = Depends(get_state),
) -> HTMLResponse:
    """The offline HTML report (`mechvis.report.write_report`) of this run's tokens: completion or
    chat, with its image and under its ablation (run B), from one teacher-forced pass over the
    prompt and the generated tokens as shown (nothing is sampled again). `layer`: the selected
    layer, added to the report's attention layers. A self-contained file that opens from file://."""

    stored = stored_run(run_id, state)
    model = state.model
    if layer is not None and layer >= model.cfg.n_layers:
        raise HTTPException(422, f"layer must be < {model.cfg.n_layers}.")
    request = GenerateRequest(**stored.request)
    prompt, chat, image = request_prompt(request), request.mode == "chat", stored.extras.get("image")
    if image is None:
        encoded, extra = encode(model, prompt, chat=chat), {}
    else:
        encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    trace = stored.trace
    if encoded.token_ids != trace.run.tokens[: trace.prompt_length].tolist():
        raise HTTPException(409, "The run's prompt no longer encodes to its tokens (was another model loaded?).")
    layers = sorted(set(default_attention_layers(model.cfg.n_layers)) | ({layer} if layer is not None else set()))
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    try:
        with contextlib.ExitStack() as contexts, tempfile.TemporaryDirectory() as directory:
            if request.ablate:
                contexts.enter_context(ablated(state, request.ablate, request.ablate_method))
            full = analysed_trace(model, encoded, list(trace.generated_ids), None, None, None,
                                   SamplingSettings(temperature=1.0), None, extra)
            path = Path(directory) / "report.html"
            write_report(model, prompt, path, chat=chat, layers=layers, image=image, trace=full)
            html = path.read_text(encoding="utf-8")
    finally:
        state.generation_lock.release()
    return HTMLResponse(html, headers={"Content-Disposition": f'attachment; filename="mechvis-{run_id}.html"'})
