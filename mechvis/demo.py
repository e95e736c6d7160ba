"""`mechvis demo`: the embedded model on a built-in chat prompt that makes it loop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mechvis.analysis import head_entropy, token_signals
from mechvis.generation import Trace
from mechvis.models import load_model
from mechvis.report import write_report

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEMO_PROMPT = "List the days of the week, over and over."


def summarise(model: "TransformerBridge", trace: Trace, *, n_heads: int = 8) -> str:
    """A plain-text analysis summary: generated text, per-token entropy, heads ranked by entropy."""
    run = trace.run
    signals = token_signals(run.logits, run.tokens)
    lines = [
        "Generated text:",
        trace.generated_text,
        "",
        "Entropy of the next-token distribution each generated token was drawn from (temperature 1):",
        f"  {'pos':>4}  {'token':<18}{'entropy (nats)':>14}  {'p(token)':>8}",
    ]
    for position in trace.generated_positions:
        source = position - 1  # the logits at position − 1 predicted this token
        probability = (-signals.surprisal[source]).exp().item()
        lines.append(f"  {position:>4}  {run.str_tokens[position]!r:<18}{signals.entropy[source].item():>14.3f}  {probability:>8.3f}")
    entropy = head_entropy(run)
    kinds = entropy.classify()
    sink_heads = sum(kind == "sink" for _, _, kind in kinds)
    ranked = [(layer, head, value) for layer, head, value in entropy.ranked() if (layer, head, "sink") not in kinds]
    sink_mass = entropy.mean_sink_mass
    lines += ["", f"Attention heads: {sink_heads} of {len(kinds)} park most attention on the first token (sinks).",
              f"Most focused other heads (mean entropy / log(visible keys), lower = more focused):"]
    lines += [f"  L{layer}H{head}: {value:.3f} (sink mass {sink_mass[layer, head].item():.2f})" for layer, head, value in ranked[:n_heads]]
    lines += ["Most diffuse heads:"]
    lines += [f"  L{layer}H{head}: {value:.3f} (sink mass {sink_mass[layer, head].item():.2f})" for layer, head, value in ranked[::-1][:n_heads]]
    return "\n".join(lines)


def run_demo(
    model_name: str | None = None, max_new_tokens: int = 64, output: str | Path = "out/demo.html", *, dtype: str = "float32"
) -> Path:
    """Load the model, write the report of the demo prompt to `output` (replacing it), print the
    plain-text summary and the report's path."""
    model = load_model(model_name, dtype=dtype)
    data = write_report(model, DEMO_PROMPT, output, chat=True, max_new_tokens=max_new_tokens, overwrite=True)
    print(f"Model: {model.cfg.model_name}\nPrompt (chat): {DEMO_PROMPT}\n")
    print(summarise(model, data.trace))
    path = Path(output).resolve()
    print(f"\nReport: {path}")
    return path
