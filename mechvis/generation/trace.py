"""What a generation produced: `Trace` (the teacher-forced run plus each step's logits and
distribution), `PromptEvent` (the prompt, streamed first), `TokenEvent` (one streamed token) and
`teacher_force`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mechvis._validation import check_names_filter, shown
from mechvis.errors import InvalidArgumentError
from mechvis.generation.sampling import SamplingSettings
from mechvis.images import with_text_appended
from mechvis.running import Run, cache_summary
from mechvis.text import decode_tokens, encode, text_preview, text_problem
from mechvis.types import Encoded, Prompt, Segments, Span

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge



@dataclass
class Trace:
    """A generation and its analysis.

    `run` is the teacher-forced forward pass over prompt + generated tokens (its segments end with
    a "generated" span). Generated token s sits at position `prompt_length + s` and was drawn from
    `step_distributions[s]`, the distribution after temperature and truncation, which came from
    the logits at position `prompt_length + s − 1`.
    """

    run: Run
    prompt_length: int
    generated_ids: list[int]
    generated_text: str  # decoded as a whole (per-token strings can split multi-byte characters)
    step_logits: Float[Tensor, "step vocab"]  # logits seen while generating, before processors; centred like Run.logits
    step_distributions: Float[Tensor, "step vocab"]  # what each token was sampled from
    step_temperatures: Float[Tensor, " step"]  # the temperature of each step (0: greedy)
    settings: SamplingSettings
    stop_reason: str | None = None  # "eos" or "max_new_tokens" (None for teacher_force)

    @property
    def generated_positions(self) -> range:
        return range(self.prompt_length, self.prompt_length + len(self.generated_ids))

    def __repr__(self) -> str:
        how = "greedy" if self.settings.greedy else f"temperature {self.settings.temperature}"
        stop = f", stopped by {self.stop_reason}" if self.stop_reason else ""
        return (f"Trace({self.prompt_length} prompt + {len(self.generated_ids)} generated tokens ({how}{stop}), "
                f"generated={text_preview(self.generated_text)}, cache {cache_summary(self.run.cache)})")

    @property
    def sampled_not_argmax(self) -> Int[Tensor, " step"]:
        """1 where the sampled token was not the raw logits' argmax."""
        return (self.step_logits.argmax(-1).cpu() != torch.tensor(self.generated_ids)).long()


@dataclass(frozen=True)
class PromptEvent:
    """The prompt as `stream_generate` decodes it: its first item, before any `TokenEvent`.

    `token_ids` are the prompt's tokens (chat template and image tokens included), `str_tokens`
    the text each one completes when the prompt is decoded whole (as `Run.str_tokens`: a token
    ending inside a multi-byte character is "" and the one completing it carries the character),
    `segments` its spans, sink positions and image grid, `max_new_tokens` the most tokens the
    generation will decode."""

    token_ids: tuple[int, ...]
    str_tokens: tuple[str, ...]
    segments: Segments
    max_new_tokens: int


@dataclass(frozen=True)
class TokenEvent:
    """One decoded token, as `stream_generate` yields it, before the next step runs.

    Generated token `step` sits at `position` (= prompt length + step). Values describe the
    distribution that produced it: `logprob`, `rank` (0 = argmax), `entropy`, `varentropy` (nats) and
    `margin` (top-1 − top-2 probability) are of the raw temperature-1 logits;
    `probability` is the token's probability under the distribution it was sampled from (after
    temperature, truncation and logits processors; 1.0 when greedy); `top_ids` / `top_probs` the
    raw distribution's top-N. `text` is what the token adds to the decoded whole generated text
    ("" while it ends inside a multi-byte character, whose text comes with the token that
    completes it). `monitor_probability` is the repetition monitor's probability that this token
    continues a loop, when decoding with `MonitorTemperature` or a `MonitorRecorder`, else None.
    """

    step: int
    position: int
    token_id: int
    text: str
    probability: float
    logprob: float
    rank: int
    entropy: float
    varentropy: float
    margin: float
    temperature: float
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]
    monitor_probability: float | None = None


class TextDeltas:
    """What each token adds to the decoded whole text: the whole sequence so far is decoded
    (byte-level tokens may end inside a multi-byte character), trailing replacement characters
    are held back until a later token completes them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += delta
        return delta


def _text_deltas(tokenizer, ids: Sequence[int]) -> list[str]:
    deltas = TextDeltas(tokenizer)
    return [deltas.add(token_id) for token_id in ids]


def eos_ids(model: "TransformerBridge") -> set[int]:
    eos = getattr(getattr(model.original_model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.hf_tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def teacher_force(
    model: "TransformerBridge",
    prompt: Prompt,
    continuation: str,
    *,
    chat: bool = False,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
) -> Trace:
    """A Trace for a given continuation, as if the model had generated it at temperature 1: one
    forward pass; `step_logits` are the logits that predicted each continuation token.

    Raises:
        InvalidArgumentError: a bad prompt, a continuation that is not a non-empty string, a bad
            names_filter, prompt and continuation beyond the context."""
    if not isinstance(continuation, str):
        raise InvalidArgumentError(f"continuation must be a string (the text to analyse); got {shown(continuation)}.")
    if text_problem(continuation):
        raise InvalidArgumentError(f"The continuation {text_problem(continuation)}.")
    names_filter = check_names_filter(model, names_filter)
    encoded = encode(model, prompt, chat=chat)
    continuation_ids = model.hf_tokenizer.encode(continuation, add_special_tokens=False)
    if not continuation_ids:
        raise InvalidArgumentError("The continuation is empty; give the text to analyse.")
    if len(encoded.token_ids) + len(continuation_ids) > model.cfg.n_ctx:
        raise InvalidArgumentError(
            f"Prompt and continuation are {len(encoded.token_ids) + len(continuation_ids)} tokens; "
            f"this model's context holds {model.cfg.n_ctx}."
        )
    return analysed_trace(model, encoded, continuation_ids, None, None, None, SamplingSettings(temperature=1.0), names_filter)


def analysed_trace(
    model: "TransformerBridge",
    encoded: Encoded,
    generated: list[int],
    step_logits: Tensor | None,
    step_distributions: Tensor | None,
    step_temperatures: Tensor | None,
    settings: SamplingSettings,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None,
    extra: dict | None = None,
    forward: bool = True,
) -> Trace:
    """One teacher-forced forward pass of the bridge over prompt + generated tokens (with the
    image inputs `extra` of a vision-language model). Without observed `step_logits`, the
    teacher-forced ones stand in, with temperature-1 distributions. `forward=False` (with
    `step_logits`) skips the pass: empty cache, logits of shape (pos, 0)."""
    all_ids = encoded.token_ids + generated
    tokens = torch.tensor(all_ids, device=model.cfg.device)
    extra = with_text_appended(extra or {}, len(generated))
    if forward:
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens[None], names_filter=names_filter, **extra)
    else:
        logits, cache = torch.empty(1, len(all_ids), 0), ActivationCache({}, model)
    decoded = decode_tokens(model.hf_tokenizer, all_ids)  # the whole sequence: no character split at a token
    spans = encoded.segments.spans + ((Span("generated", len(encoded.token_ids), len(all_ids)),) if generated else ())
    run = Run(
        text=decoded.text,
        tokens=tokens,
        str_tokens=decoded.str_tokens,
        offsets=decoded.offsets,
        logits=logits[0],
        cache=cache,
        segments=Segments(spans, encoded.segments.sink_positions, encoded.segments.image_grid),
    )
    if step_logits is None:
        step_logits = run.logits[len(encoded.token_ids) - 1 : -1].float()
        step_distributions = step_logits.softmax(-1)
        step_temperatures = torch.ones(len(generated))
    return Trace(
        run=run,
        prompt_length=len(encoded.token_ids),
        generated_ids=generated,
        generated_text=model.hf_tokenizer.decode(generated),
        step_logits=step_logits,
        step_distributions=step_distributions,
        step_temperatures=step_temperatures,
        settings=settings,
    )
