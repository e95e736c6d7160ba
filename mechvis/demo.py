"""`mechvis demo`: the embedded model on a built-in chat prompt that makes it loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from mechvis.analysis import head_entropy, token_signals
from mechvis.generation import Trace, generate
from mechvis.models import load_model

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
    entropy = head_entropy(run.cache, model)
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


def run_demo(model_name: str | None = None, max_new_tokens: int = 48) -> str:
    """Load the model, generate from the demo prompt, print and return the summary."""
    stages = tqdm(total=3, desc="mechvis demo", unit="stage")
    stages.set_postfix_str("loading the model")
    model = load_model(model_name)
    stages.update()
    stages.set_postfix_str("generating and analysing")
    trace = generate(model, DEMO_PROMPT, chat=True, max_new_tokens=max_new_tokens)
    stages.update()
    stages.set_postfix_str("summarising")
    summary = summarise(model, trace)
    stages.update()
    stages.close()
    print(f"Model: {model.cfg.model_name}\nPrompt (chat): {DEMO_PROMPT}\n")
    print(summary)
    return summary
