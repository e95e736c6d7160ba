"""`mechvis ablate`: a head-ablation study of one target token, as a self-contained HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from mechvis.interventions import AblationSweep, Method, ablation_sweep, reference_runs, reference_tokens, target_probability
from mechvis.report import check_writable
from mechvis.report.html import STYLE, ablation_section
from mechvis.running import run

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def write_ablation_report(
    model: "TransformerBridge",
    prompt: str,
    target: int | str,
    path: str | Path,
    *,
    method: Method = "zero",
    chat: bool = False,
    overwrite: bool = False,
) -> AblationSweep:
    """Sweep every head's ablation on P(target) at the prompt's last position; write the page."""

    output = Path(path)
    check_writable(output, overwrite)
    result = run(model, prompt, chat=chat, names_filter=[])
    metric = target_probability(model, target)
    reference = None
    if method == "mean":
        reference = reference_runs(model)
    elif method == "resample":
        reference = reference_tokens(model, len(result.tokens))
    sweep = ablation_sweep(model, result.tokens, metric, method=method, reference=reference)
    label = repr(target if isinstance(target, str) else model.hf_tokenizer.decode([target]))
    document = "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><title>mechvis head ablation</title>',
        f"<style>{STYLE}</style></head><body><h1>Head ablation</h1>",
        f'<p><b>Prompt</b>:</p><div class="tokens prompt">{html.escape(result.text)}</div>',
        ablation_section(sweep, label),
        "</body></html>",
    ])
    output.write_text(document, encoding="utf-8")
    return sweep
