"""GET /api/runs/{id}/export.json and /export.html (the offline report of the same generation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse

from mechvis.serve.routers.runs import RunId, _run, get_run
from mechvis.serve.state import ServerState, get_state

router = APIRouter(prefix="/api/runs", tags=["export"])


@router.get("/{run_id}/export.json")
def export_json(run_id: str = RunId, state: ServerState = Depends(get_state)) -> JSONResponse:
    """The run as JSON: request, tokens, streamed events, signals, repetition."""
    return JSONResponse(get_run(run_id, state), headers={"Content-Disposition": f'attachment; filename="mechvis-{run_id}.json"'})


@router.get("/{run_id}/export.html", response_class=HTMLResponse)
def export_html(run_id: str = RunId, state: ServerState = Depends(get_state)) -> HTMLResponse:
    """The offline HTML report (`mechvis.report.write_report`) of this run's prompt and settings,
    regenerated with the same seed; a self-contained file that opens from file://."""
    from mechvis.report import write_report

    stored = _run(run_id, state)
    request = stored.request
    if request.get("mode") == "chat":
        raise HTTPException(422, "The offline report is written for completion prompts; export JSON for chats.")
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "report.html"
            write_report(state.model, request["prompt"], path, max_new_tokens=request["max_new_tokens"],
                         temperature=request["temperature"], seed=request["seed"])
            html = path.read_text(encoding="utf-8")
    finally:
        state.generation_lock.release()
    return HTMLResponse(html, headers={"Content-Disposition": f'attachment; filename="mechvis-{run_id}.html"'})
