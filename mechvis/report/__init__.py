"""Self-contained offline HTML reports (and their JSON export)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mechvis.errors import InvalidArgumentError
from mechvis.report.build import ROLLOUT_QUERIES, SCHEMA, ReportData, build_report_data, report_json
from mechvis.report.html import render_report, write_json

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation import Trace

__all__ = ["SCHEMA", "ReportData", "build_report_data", "render_report", "report_json", "write_json", "write_report"]


def check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists; choose another path or pass overwrite=True (--force).")
    if path.exists() and path.is_dir():
        raise InvalidArgumentError(f"{path} is a directory; give a file name such as report.html.")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise InvalidArgumentError(f"{path} cannot be written: {blocking} is a file, not a directory.")


def write_report(
    model: "TransformerBridge",
    prompt: str,
    path: str | Path,
    *,
    json_path: str | Path | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    layers: Sequence[int] | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    ablation: bool = False,
    image: object | None = None,
    overwrite: bool = False,
    rollout_queries: Sequence[int] | int = ROLLOUT_QUERIES,
    full_rollout: bool = False,
    trace: "Trace | None" = None,
) -> ReportData:
    """Generate from `prompt`, analyse, and write the HTML report (and the JSON if asked); with
    `ablation`, add a sweep of every head's ablation on the last generated token's probability;
    with `image` (a vision-language model), add where the generated tokens look in it. With
    `trace`, report on that trace instead of generating (see `build_report_data`).
    The rollout is kept as rows for `rollout_queries` (see `build_report_data`); `full_rollout`
    adds the N × N matrix to the JSON. Existing files are not replaced unless `overwrite`."""
    html_path = Path(path)
    check_writable(html_path, overwrite)
    if json_path is not None:
        check_writable(Path(json_path), overwrite)
    data = build_report_data(model, prompt, chat=chat, max_new_tokens=max_new_tokens, layers=layers,
                             temperature=temperature, seed=seed, ablation=ablation, image=image,
                             rollout_queries=rollout_queries, full_rollout=full_rollout, trace=trace)
    page = render_report(data, model)
    for target in (html_path, None if json_path is None else Path(json_path)):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no directories behind
    html_path.write_text(page, encoding="utf-8")
    if json_path is not None:
        write_json(data, Path(json_path))
    return data
