"""The one place the app meets the decoding loop: `token_stream` yields one token event per
decoded token, then the analysed `Trace`.

While `mechvis.stream_generate` is not on this branch, `token_stream` runs `mechvis.generate`
to the end and replays its steps as events (then a stop cannot interrupt decoding; it takes
effect after). Switching is the one line marked below.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mechvis


@dataclass
class _ReplayedEvent:  # the fields of mechvis.TokenEvent
    step: int
    position: int
    token_id: int
    text: str
    probability: float
    rank: int
    entropy: float
    varentropy: float
    margin: float
    temperature: float
    top_ids: list[int]
    top_probs: list[float]
    monitor_probability: float | None


def token_stream(model, prompt, **options) -> Iterator:
    """Events (with the attributes of `mechvis.TokenEvent`), then the Trace. `close()` cancels."""
    stream_generate = getattr(mechvis, "stream_generate", None)
    if stream_generate is not None:  # the library's streaming decoder, when present
        return stream_generate(model, prompt, **options)
    return _replayed(model, prompt, **options)


def _replayed(model, prompt, *, top_n: int = 10, **options) -> Iterator:
    from mechvis.analysis import token_signals

    trace = mechvis.generate(model, prompt, **options)
    signals = token_signals(trace.step_logits, k=top_n)
    log_probs = trace.step_logits.double().log_softmax(-1)
    ids = trace.generated_ids
    chosen = log_probs[range(len(ids)), ids]
    ranks = (log_probs > chosen[:, None]).sum(-1)
    tokenizer = model.hf_tokenizer
    previous = ""
    for step, token_id in enumerate(ids):
        text = tokenizer.decode(ids[: step + 1])
        new, previous = text[len(previous):], text
        yield _ReplayedEvent(
            step=step, position=trace.prompt_length + step, token_id=token_id, text=new,
            probability=float(chosen[step].exp()), rank=int(ranks[step]), entropy=float(signals.entropy[step]),
            varentropy=float(signals.varentropy[step]), margin=float(signals.margin[step]),
            temperature=float(trace.step_temperatures[step]), top_ids=signals.top_ids[step].tolist(),
            top_probs=signals.top_probs[step].tolist(), monitor_probability=None,
        )
    yield trace
