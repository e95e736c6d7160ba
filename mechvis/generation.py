"""`generate`: sample from a hooked model with HF's KV-cached `generate`, then analyse the whole
sequence with ONE teacher-forced forward pass of the bridge (what the model computed step by step).

Generating through the bridge token by token is about 12× slower than HF generate plus one
analysis forward, for the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis.analysis._checks import check_bool, check_integer, check_names_filter, check_real, integer, real, shown
from mechvis.analysis.repetition import (
    InductionHeads,
    RepetitionMonitor,
    StreamingFeatures,
    find_induction_heads,
    rep_labels,
)
from mechvis.errors import InvalidArgumentError
from mechvis.lean_decoding import _column, acting_hooks, lean_decoding_equal, preallocated_cache, with_lean_steps
from mechvis.running import (
    Encoded,
    Prompt,
    Run,
    Segments,
    Span,
    decode_tokens,
    encode,
    encode_with_image,
    text_problem,
    with_text_appended,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens were chosen. temperature 0 is greedy; top_k / top_p / min_p None are off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    schedule: "TemperatureSchedule | None" = None

    def validate(self) -> None:
        """Check every setting and normalise integer- and real-likes to int and float.

        Raises:
            InvalidArgumentError: temperature < 0 or not a number, top_k < 1, top_p outside
                (0, 1], min_p outside [0, 1], a seed that is not an integer torch accepts
                (−2⁶³ … 2⁶⁴ − 1), a schedule that is not a temperature schedule."""
        temperature = real(self.temperature)
        if temperature is None or not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgumentError(f"temperature must be a number ≥ 0 (0 = greedy); got {self.temperature!r}.")
        object.__setattr__(self, "temperature", temperature)
        if self.top_k is not None:
            top_k = integer(self.top_k)
            if top_k is None or top_k < 1:
                raise InvalidArgumentError(f"top_k must be a positive integer or None; got {self.top_k!r}.")
            object.__setattr__(self, "top_k", top_k)
        if self.top_p is not None:
            object.__setattr__(self, "top_p", check_real(self.top_p, "top_p", low=0.0, high=1.0, low_open=True, hint=" (None = off)"))
        if self.min_p is not None:
            object.__setattr__(self, "min_p", check_real(self.min_p, "min_p", low=0.0, high=1.0, hint=" (None = off)"))
        if self.seed is not None:
            object.__setattr__(self, "seed", check_integer(
                self.seed, "seed", low=-(2**63), high=2**64 - 1, bounds="from −2**63 to 2**64 − 1", hint=" (None = unseeded)"
            ))
        schedule = self.schedule
        if schedule is not None and not isinstance(schedule, (EntropyTemperature, RepetitionTemperature, MonitorTemperature)) \
                and not callable(getattr(schedule, "temperature", None)):
            raise InvalidArgumentError(
                f"temperature_schedule must be None, EntropyTemperature, RepetitionTemperature or MonitorTemperature "
                f"(from mechvis.generation); got {shown(schedule)}."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EntropyTemperature:
    """Entropy-based dynamic temperature (EDT, Zhang et al. 2024): T_t = base · n^(θ / H_t), with
    H_t the entropy (nats) of the next-token distribution. Confident steps cool toward greedy;
    uncertain ones approach `base`."""

    base: float = 1.0
    n: float = 0.8
    theta: float = 1.0

    def __post_init__(self):
        if not (self.base > 0 and 0 < self.n and self.theta >= 0):
            raise InvalidArgumentError(f"EntropyTemperature needs base > 0, n > 0 and theta ≥ 0; got {self}.")

    def temperature(self, entropy: Tensor, generated: Tensor) -> Tensor:
        return self.base * torch.pow(torch.tensor(self.n), self.theta / entropy.clamp_min(1e-6))


def _check_range(schedule: "RepetitionTemperature | MonitorTemperature") -> None:
    if not 0 <= schedule.low <= schedule.high:
        raise InvalidArgumentError(f"{type(schedule).__name__} needs 0 ≤ low ≤ high; got low={schedule.low}, high={schedule.high}.")


@dataclass(frozen=True)
class RepetitionTemperature:
    """Loop-breaking temperature from the text: T_t = low + (high − low) · r_t, with r_t the share
    of the last `window` generated tokens that complete an n-gram already generated (the
    text-level loop label, causal). Fresh text is sampled cool; a loop heats the sampler until
    it breaks."""

    low: float = 0.7
    high: float = 1.6
    n: int = 4
    window: int = 16

    def __post_init__(self):
        _check_range(self)
        if self.n < 1 or self.window < 1:
            raise InvalidArgumentError(f"RepetitionTemperature needs n ≥ 1 and window ≥ 1; got n={self.n}, window={self.window}.")

    def temperature(self, entropy: Tensor, generated: Tensor) -> Tensor:
        rates = []
        for row in generated.tolist():
            labels = rep_labels(row, n=self.n) if len(row) >= self.n else torch.zeros(1)
            rates.append(labels[-self.window :].float().mean())
        return self.low + (self.high - self.low) * torch.stack(rates).to(entropy.device)


@dataclass(frozen=True)
class MonitorTemperature:
    """Loop-breaking temperature from the model's internals: T_t = low + (high − low) · P_t, with
    P_t the repetition monitor's probability that token t continues a loop, computed while
    decoding from the state that produces token t (`StreamingFeatures`: the signals
    `repetition_features` reads from the finished trace, by the same formulas). Without an
    intervention or image the signals are recorded by forward hooks on the HF modules, so decoding
    keeps the fast path (22–24 tokens/s streamed on the embedded model at N ≈ 500, against ~9
    through the bridge); with either, by hook-point hooks through the bridge.

    monitor: None for the weights shipped with mechvis. induction: None to find the heads
    (`find_induction_heads`) at the start of each generate call.
    """

    low: float = 0.7
    high: float = 1.6
    monitor: RepetitionMonitor | None = field(default=None, compare=False, repr=False)
    induction: InductionHeads | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _check_range(self)


TemperatureSchedule = Union[EntropyTemperature, RepetitionTemperature, MonitorTemperature]


class _ScheduledTemperature:
    """HF logits processor that divides each step's logits by the temperature `temperature_of`
    (input_ids, scores) gives it, and records that temperature."""

    def __init__(self, temperature_of: Callable[[Tensor, Tensor], Tensor]):
        self.temperature_of = temperature_of
        self.temperatures: list[float] = []
        self.monitor_probabilities: list[float] = []  # MonitorTemperature's P of each step
        self.on_modules = False  # MonitorTemperature's signals recorded on the HF modules, not the bridge

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        temperature = self.temperature_of(input_ids, scores).clamp_min(1e-4)
        self.temperatures.append(float(temperature[0]))  # generate decodes one sequence
        return scores / temperature[:, None].to(scores.dtype)


def _entropy(scores: Tensor) -> Tensor:
    log_probs = scores.float().log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1)


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
        from mechvis.running import cache_summary, text_preview

        how = "greedy" if self.settings.greedy else f"temperature {self.settings.temperature}"
        stop = f", stopped by {self.stop_reason}" if self.stop_reason else ""
        return (f"Trace({self.prompt_length} prompt + {len(self.generated_ids)} generated tokens ({how}{stop}), "
                f"generated={text_preview(self.generated_text)}, cache {cache_summary(self.run.cache)})")

    @property
    def sampled_not_argmax(self) -> Int[Tensor, " step"]:
        """1 where the sampled token was not the raw logits' argmax."""
        return (self.step_logits.argmax(-1).cpu() != torch.tensor(self.generated_ids)).long()


def _step_distributions(scores: Sequence[Tensor], settings: SamplingSettings) -> Tensor:
    processed = torch.stack([step[0] for step in scores]).float()
    if settings.greedy:  # greedy picks the argmax: a one-hot distribution
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


@dataclass(frozen=True)
class TokenEvent:
    """One decoded token, as `stream_generate` yields it, before the next step runs.

    Generated token `step` sits at `position` (= prompt length + step). Values describe the
    distribution that produced it: `logprob`, `rank` (0 = argmax), `entropy`, `varentropy` and
    `margin` (top-1 − top-2 probability) are of the raw temperature-1 logits, in nats;
    `probability` is the token's probability under the distribution it was sampled from (after
    temperature, truncation and logits processors; 1.0 when greedy); `top_ids` / `top_probs` the
    raw distribution's top-N. `text` is what the token adds to the decoded whole generated text
    ("" while it ends inside a multi-byte character, whose text comes with the token that
    completes it). `monitor_probability` is the repetition monitor's probability that this token
    continues a loop, when decoding with `MonitorTemperature`, else None.
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


class _Recorder:
    """A logits processor that records the scores it is given (and changes nothing)."""

    def __init__(self) -> None:
        self.latest: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.latest = scores[0].detach().float().clone()
        return scores


def _sampling_processors(settings: SamplingSettings) -> list:
    """The truncation and temperature warpers for `settings`, HF's own classes in the order HF's
    `generate` applies them (temperature, top-k, top-p, min-p). mechvis applies them itself so
    that nothing else (a model's shipped generation_config, HF's default top-k of 50) joins in."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if settings.greedy:
        return []
    warpers: list = []
    if settings.schedule is None and settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k is not None:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p is not None and settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    if settings.min_p is not None:
        warpers.append(MinPLogitsWarper(settings.min_p))
    return warpers


@contextlib.contextmanager
def _neutral_generation_config(decoder: "torch.nn.Module") -> Iterator["object"]:
    """While active, `decoder.generation_config` is HF's neutral default, keeping only the
    model's end-of-sequence, padding and BOS ids: HF's `generate` fills every setting a call
    leaves unset from the model's generation_config (repetition penalty, beams, banned words,
    top-k ...), which would change the distribution mechvis samples from."""
    from transformers import GenerationConfig

    shipped = getattr(decoder, "generation_config", None)
    neutral = GenerationConfig(
        **{name: getattr(shipped, name, None) for name in ("eos_token_id", "pad_token_id", "bos_token_id")}
    )
    decoder.generation_config = neutral
    try:
        yield neutral
    finally:
        decoder.generation_config = shipped


class _TextDeltas:
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
    deltas = _TextDeltas(tokenizer)
    return [deltas.add(token_id) for token_id in ids]


class _Cancelled(Exception):
    """Raised inside the decoding thread when the consumer stops iterating."""


def stream_generate(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    temperature_schedule: TemperatureSchedule | None = None,
    logits_processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = (),
    image: object | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    top_n: int = 10,
    analysis_pass: bool = True,
) -> Iterator["TokenEvent | Trace"]:
    """Generate as `generate` does, yielding a `TokenEvent` for each token as soon as it is
    decoded, then the analysed `Trace` as the last item.

    Decoding is HF's KV-cached `generate`, run in a worker thread; the events' values equal the
    trace's (`step_logits`, `step_distributions`, `step_temperatures`) exactly. Closing the
    iterator (or breaking out of a loop over it) cancels decoding: the step running finishes,
    no further step starts, and no trace is built. `trace.stop_reason` is "eos" or
    "max_new_tokens".

    Args: as `generate`, plus `top_n`, the number of most probable tokens in each event (1–1000).

    Raises:
        InvalidArgumentError: bad settings, a prompt too long for the context (before decoding).
    """
    import queue
    import threading

    from transformers import LogitsProcessorList
    from transformers.generation.streamers import BaseStreamer

    if temperature_schedule is not None:
        temperature = 1.0  # the schedule sets each step's temperature
    chat = check_bool(chat, "chat")
    analysis_pass = check_bool(analysis_pass, "analysis_pass")
    settings = SamplingSettings(temperature, top_k, top_p, min_p, seed, temperature_schedule)
    settings.validate()
    user_processors = _checked_processors(logits_processors)
    names_filter = check_names_filter(model, names_filter)
    checked = integer(top_n)
    if checked is None or not 1 <= checked <= 1000:
        raise InvalidArgumentError(f"top_n must be an integer in [1, 1000]; got {top_n!r}.")
    top_n = checked
    extra: dict = {}
    if image is not None:
        encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    else:
        encoded = encode(model, prompt, chat=chat)
    n_ctx = model.cfg.n_ctx
    checked = integer(max_new_tokens)
    if checked is None or checked < 1:
        raise InvalidArgumentError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    max_new_tokens = checked
    if len(encoded.token_ids) + max_new_tokens > n_ctx:
        raise InvalidArgumentError(
            f"The prompt ({len(encoded.token_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"this model's context of {n_ctx} tokens; lower max_new_tokens to at most "
            f"{n_ctx - len(encoded.token_ids)}."
        )
    device = model.cfg.device
    prompt_ids = torch.tensor([encoded.token_ids], device=device)
    prompt_length = len(encoded.token_ids)
    tokenizer = model.hf_tokenizer
    events: "queue.Queue[tuple[str, object]]" = queue.Queue()
    cancelled = threading.Event()
    raw, processed = _Recorder(), _Recorder()
    text = _TextDeltas(tokenizer)  # also holds the ids decoded so far

    def token_event(token_id: int, scheduled: "_ScheduledTemperature | None") -> TokenEvent:
        logits = raw.latest
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum()
        varentropy = (probs * (-log_probs - entropy) ** 2).sum()
        top = probs.topk(max(top_n, 2))
        step = len(text.ids)
        probability = 1.0 if settings.greedy else float(processed.latest.softmax(-1)[token_id])
        return TokenEvent(
            step=step,
            position=prompt_length + step,
            token_id=token_id,
            text=text.add(token_id),
            probability=probability,
            logprob=float(log_probs[token_id]),
            rank=int((logits > logits[token_id]).sum()),
            entropy=float(entropy),
            varentropy=float(varentropy),
            margin=float(top.values[0] - top.values[1]),
            temperature=scheduled.temperatures[-1] if scheduled else settings.temperature,
            top_ids=tuple(top.indices[:top_n].tolist()),
            top_probs=tuple(top.values[:top_n].tolist()),
            monitor_probability=scheduled.monitor_probabilities[-1] if scheduled and scheduled.monitor_probabilities else None,
        )

    class Streamer(BaseStreamer):
        def __init__(self, scheduled: "_ScheduledTemperature | None") -> None:
            self.scheduled, self.prompt_seen = scheduled, False

        def put(self, value: Tensor) -> None:
            if not self.prompt_seen:  # generate first hands the streamer the prompt
                self.prompt_seen = True
                return
            if cancelled.is_set():
                raise _Cancelled
            events.put(("token", token_event(int(value.reshape(-1)[0]), self.scheduled)))

        def end(self) -> None:
            pass

    def decode() -> None:
        try:
            options = dict(
                max_new_tokens=max_new_tokens,
                do_sample=not settings.greedy,
                output_logits=True,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                top_k=0,  # sampling settings are applied by mechvis's processors below
            )
            # Inference mode: ~3% less per-op overhead in the decoding loop than no_grad.
            with torch.inference_mode(), torch.random.fork_rng(devices=[] if device == "cpu" else None), \
                    contextlib.ExitStack() as stack:
                scheduled = None
                decoder = _decoder(model, with_image=bool(extra))
                if isinstance(temperature_schedule, MonitorTemperature):
                    scheduled = stack.enter_context(
                        _monitor_temperature(model, temperature_schedule, encoded, bridge=decoder is model.original_model)
                    )
                    if not scheduled.on_modules:  # the monitor's hook-point hooks: decode through the bridge
                        decoder = model.original_model
                stack.enter_context(_neutral_generation_config(decoder))
                if temperature_schedule is not None and scheduled is None:
                    schedule = temperature_schedule
                    scheduled = _ScheduledTemperature(
                        lambda ids, scores: schedule.temperature(_entropy(scores), ids[:, prompt_length:])
                    )
                processors = [raw, *user_processors, *([scheduled] if scheduled else []), *_sampling_processors(settings), processed]
                options["logits_processor"] = LogitsProcessorList(processors)
                preallocated = preallocated_cache(decoder, prompt_length + max_new_tokens)
                if preallocated is not None:
                    options[preallocated[0]] = preallocated[1]
                chunk = _prefill_chunk(model, decoder, prompt_length, extra)
                if chunk is not None:
                    options["prefill_chunk_size"] = chunk
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                output = decoder.generate(
                    prompt_ids, attention_mask=torch.ones_like(prompt_ids), streamer=Streamer(scheduled), **extra, **options
                )
            events.put(("done", (output, scheduled)))
        except _Cancelled:
            events.put(("cancelled", None))
        except BaseException as error:  # handed to the consumer, raised there
            events.put(("error", error))

    worker = threading.Thread(target=decode, name="mechvis-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "token":
                yield payload
            elif kind == "error":
                raise payload
            elif kind == "cancelled":
                return
            else:
                break
    finally:
        cancelled.set()
        worker.join()
    output, scheduled = payload
    generated_ids = output.sequences[0, prompt_length:].tolist()
    eos = _eos_ids(model)
    trace = _analysed_trace(
        model,
        encoded,
        generated_ids,
        step_logits=torch.stack([step[0] for step in output.logits]).float(),
        step_distributions=_step_distributions(output.scores, settings),
        step_temperatures=torch.tensor(scheduled.temperatures) if scheduled else torch.full((len(generated_ids),), settings.temperature),
        settings=settings,
        names_filter=names_filter,
        extra=extra,
        forward=analysis_pass,
    )
    trace.stop_reason = "eos" if generated_ids and generated_ids[-1] in eos else "max_new_tokens"
    yield trace


_PREFILL_SCORE_BYTES = 128 << 20  # one prefill chunk's attention scores (heads × chunk × N float32) stay under this


class _CheckedProcessor:
    """A user's logits processor whose every result is checked: the scores, as a tensor of the
    shape it was given (a processor that returns None or another shape is named in the error)."""

    def __init__(self, processor: Callable[[Tensor, Tensor], Tensor], index: int) -> None:
        self.processor, self.index = processor, index

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        result = self.processor(input_ids, scores)
        if not isinstance(result, Tensor) or result.shape != scores.shape:
            got = f"a tensor of shape {tuple(result.shape)}" if isinstance(result, Tensor) else shown(result, 40)
            raise InvalidArgumentError(
                f"logits processor {self.index} ({_processor_name(self.processor)}) returned {got}; a processor "
                f"f(input_ids, scores) must return the scores, a tensor of shape {tuple(scores.shape)}."
            )
        return result


def _processor_name(processor: object) -> str:
    return getattr(processor, "__qualname__", None) or type(processor).__name__


def _checked_processors(processors: object) -> list[_CheckedProcessor]:
    """`logits_processors` as a list of result-checking wrappers.

    Raises:
        InvalidArgumentError: not a list/tuple of callables (one processor must be in a list)."""
    if callable(processors) and not isinstance(processors, (list, tuple)):
        raise InvalidArgumentError(
            f"logits_processors must be a list of processors; got one ({_processor_name(processors)}): pass [processor]."
        )
    if isinstance(processors, (str, bytes)) or not isinstance(processors, Iterable):
        raise InvalidArgumentError(
            f"logits_processors must be a list of functions f(input_ids, scores) → scores; got {shown(processors)}."
        )
    processors = list(processors)
    for index, processor in enumerate(processors):
        if not callable(processor):
            raise InvalidArgumentError(
                f"logits processor {index} is not callable: {shown(processor)}; a processor is f(input_ids, scores) → scores."
            )
    return [_CheckedProcessor(processor, index) for index, processor in enumerate(processors)]


def _prefill_chunk(model: "TransformerBridge", decoder: "torch.nn.Module", prompt_length: int, extra: dict) -> int | None:
    """Queries per prefill chunk when a prompt's eager attention scores (heads × N × N floats)
    would exceed `_PREFILL_SCORE_BYTES` (8,192 tokens of the embedded model: 2.4 GB per layer, and
    the softmax as much again), else None (one prefill). Only on the HF modules' own path: the
    bridge (hooks active) and image inputs (which HF cannot split) prefill at once."""
    if decoder is model.original_model or extra:
        return None
    heads = model.cfg.n_heads
    if heads * prompt_length * prompt_length * 4 <= _PREFILL_SCORE_BYTES:
        return None
    return max(64, _PREFILL_SCORE_BYTES // (4 * heads * prompt_length))


def _eos_ids(model: "TransformerBridge") -> set[int]:
    eos = getattr(getattr(model.original_model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.hf_tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def generate(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    temperature_schedule: TemperatureSchedule | None = None,
    logits_processors: Sequence[Callable[[Tensor, Tensor], Tensor]] = (),
    image: object | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    analysis_pass: bool = True,
) -> Trace:
    """Generate up to `max_new_tokens` (stopping at the model's end-of-sequence token) and analyse:
    `stream_generate` run to the end.

    Sampling is exactly what the arguments say: nothing from the model's shipped
    generation_config changes the distribution (only its end-of-sequence and padding ids are
    used), and no truncation is applied unless asked for.

    Args:
        prompt, chat: as in `mechvis.run` (chat mode uses the model's chat template).
        temperature: 0 for greedy decoding, else sampling at that temperature.
        top_k, top_p, min_p: truncation of the sampling distribution (None = off).
        seed: seeds the sampler without touching the global random state.
        temperature_schedule: a per-step temperature (EntropyTemperature, RepetitionTemperature
            or MonitorTemperature) replacing the fixed `temperature`; sampling then uses it with
            top_k/top_p/min_p. Each step's temperature is in `Trace.step_temperatures`.
        image: for a vision-language model, the image (as in `mechvis.run`).
        logits_processors: HF-style processors f(input_ids, scores) → scores applied before
            sampling, e.g. `mechvis.interventions.KeywordBoost`. (Hook interventions apply
            through `with mechvis.interventions.intervene(model, ...)` around this call.)
        names_filter: hooks to cache in the analysis pass (None: all).
        analysis_pass: False skips the teacher-forced analysis pass: `trace.run` then has the
            tokens and texts, an empty cache and logits of shape (pos, 0) (the step logits are
            kept). For inputs whose full pass would not fit in memory: `mechvis report`'s
            long-context path analyses the tokens with `mechvis.analysis.analyse_long` instead.

    Long prompts are prefilled in chunks of queries (HF's `prefill_chunk_size`, see
    `_prefill_chunk`) so that eager attention never holds a (heads, N, N) score matrix.

    Raises:
        InvalidArgumentError: bad settings, or a prompt plus max_new_tokens beyond the context.
    """
    *_, trace = stream_generate(
        model, prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, seed=seed, temperature_schedule=temperature_schedule,
        logits_processors=logits_processors, image=image, names_filter=names_filter, analysis_pass=analysis_pass,
    )
    return trace


@contextlib.contextmanager
def _monitor_temperature(
    model: "TransformerBridge", schedule: MonitorTemperature, encoded: Encoded, *, bridge: bool = True
) -> Iterator[_ScheduledTemperature]:
    """While active, hooks stream the monitor's signals and keep each step's logits (as the model
    returns them, before any logits processor); the processor yielded sets the temperature.

    When the decode runs the HF modules without the bridge (`bridge=False`: no intervention, no
    image), the signals are recorded by forward hooks on those modules
    (`StreamingFeatures.module_hooks`), so decoding keeps the fast path: the bridge's hooked
    forward cost ~3× a plain step on the embedded model. Otherwise (or when the model does not
    expose eager attention weights) by hook-point hooks, and the decode must go through the
    bridge: `scheduled.on_modules` says which."""
    monitor = schedule.monitor if schedule.monitor is not None else RepetitionMonitor.load()
    streaming = StreamingFeatures(
        model,
        schedule.induction if schedule.induction is not None else find_induction_heads(model),
        prompt_length=len(encoded.token_ids),
        sinks=encoded.segments.sink_positions,
    )
    latest: dict[str, Tensor] = {}

    def keep_logits(module: torch.nn.Module, args: tuple, output) -> None:
        latest["logits"] = output.logits[0, -1]

    def temperature(input_ids: Tensor, scores: Tensor) -> Tensor:
        loop_probability = monitor.probability(streaming.step(input_ids[0], latest["logits"])[None])
        scheduled.monitor_probabilities.append(float(loop_probability.reshape(-1)[0]))
        return (schedule.low + (schedule.high - schedule.low) * loop_probability).to(scores.device)

    scheduled = _ScheduledTemperature(temperature)
    module_hooks = None if bridge else streaming.module_hooks(model)
    scheduled.on_modules = module_hooks is not None
    handles = [model.original_model.register_forward_hook(keep_logits)]
    try:
        if module_hooks is not None:
            handles += [module.register_forward_hook(hook) for module, hook in module_hooks]
            yield scheduled
        else:
            with model.hooks(fwd_hooks=streaming.hooks()):
                yield scheduled
    finally:
        for handle in handles:
            handle.remove()


def _decoder(model: "TransformerBridge", with_image: bool = False) -> "torch.nn.Module":
    """The model HF's KV-cached generate runs. With no hook on any of the bridge's hook points
    (no intervention active) and no image, the HF modules the bridge wraps, rebuilt around its
    components and sharing every parameter (hooks on HF modules stay), with float32 CPU
    `nn.Linear`s as `_SingleRowLinear` where that was measured faster, and lean single-token
    steps where the architecture has them (`_leaner`): the same logits up to rounding (≤ 1e-4).
    With a hook-point hook, the bridge itself, so it applies. With an image,
    the bridge too: a vision tower reads selected hidden states through transformers' output
    capturing, whose hooks and "installed" flag would not carry over to the rebuilt copy
    (LLaVA's image features came back empty when the copy decoded first)."""
    from transformer_lens.hook_points import HookPoint

    if with_image or any(
        isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks) for module in model.modules()
    ):
        return model.original_model
    return _leaner(model.original_model, _unwrapped(model.original_model))


def _leaner(root: "torch.nn.Module", decoder: "torch.nn.Module") -> "torch.nn.Module":
    """`decoder` with lean single-token decoding steps (`mechvis.lean_decoding`) where its
    architecture has them and they were checked equal to HF's forward for `root`, else `decoder`."""
    lean = with_lean_steps(decoder)
    if lean is None or not lean_decoding_equal(root, decoder, lean):
        return decoder
    return lean


def prepare_decoding(model: "TransformerBridge") -> None:
    """Make the one-time measurements of fast decoding now (`_halves_win`, ~0.3 s for the
    embedded model on a 2-core machine) rather than in the first `generate` call: `mechvis
    serve` calls it after loading, so the first request's time to first token does not pay it."""
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        _halves_win(original)
        _grouped_attention_equal(original)
        _leaner(original, _unwrapped(original))


def _unwrapped(module: "torch.nn.Module", halves: bool | None = None, grouped: bool | None = None) -> "torch.nn.Module":
    """`module` with every bridge component replaced by the HF module it wraps and, where the
    halves product was measured faster for this model (`_halves_win`), every suitable `nn.Linear`
    by a `_SingleRowLinear`; where grouped-query attention was checked equal for this model
    (`_grouped_attention_equal`), eager attention modules run `_grouped_eager_attention` (shallow
    copies where something changes; parameters and buffers are shared, nothing is modified)."""
    if halves is None:
        halves = _halves_win(module)
    if grouped is None:
        grouped = _grouped_attention_equal(module)
    original = module._modules.get("_original_component")
    if original is not None:
        return _unwrapped(original, halves, grouped)
    if halves and type(module) is torch.nn.Linear and _SingleRowLinear.suits(module):
        clone = copy.copy(module)  # shares the parameters and any hooks
        clone.__class__ = _SingleRowLinear
        return clone
    children = {name: None if child is None else _unwrapped(child, halves, grouped) for name, child in module._modules.items()}
    regroup = grouped and _groups_queries(module)
    if not regroup and all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    object.__setattr__(clone, "_modules", children)
    if regroup:
        object.__setattr__(clone, "config", _grouped_config(module.config))
    return clone


_GROUPED_ATTENTION = "mechvis_grouped_eager"


def _groups_queries(module: "torch.nn.Module") -> bool:
    """An HF attention module with grouped-query attention (more query than key/value heads)
    that runs transformers' eager attention."""
    config = getattr(module, "config", None)
    return (getattr(module, "num_key_value_groups", 1) > 1 and hasattr(config, "_attn_implementation_internal")
            and config._attn_implementation == "eager")


def _grouped_config(config):
    """A shallow copy of an attention module's config selecting `_grouped_eager_attention` (set
    on the copy only: the model and its other modules keep "eager", and so eager's masks)."""
    from transformers import AttentionInterface

    if _GROUPED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_GROUPED_ATTENTION, _grouped_eager_attention)
    clone = copy.copy(config)
    object.__setattr__(clone, "_attn_implementation_internal", _GROUPED_ATTENTION)  # this copy only, no sub-configs
    return clone


def _grouped_eager_attention(
    module: "torch.nn.Module",
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (scores · scaling, optional tanh soft-capping, additive mask,
    float32 softmax; returns the output and the weights (batch, head, query, key)) for grouped-
    query attention, without `repeat_kv`: HF's eager copies every cached key and value once per
    query head in the group at every step (30 layers × 2 × 9 heads × N × 64 floats for the
    embedded model: ~70 MB written per token at N = 500, as long as its weight products took in
    a profile). Here each key/value head's queries are one batch of rows of a single product."""
    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if scaling is None:
        scaling = module.head_dim**-0.5
    rows = query.reshape(batch, kv_heads, heads // kv_heads * queries, head_dim)  # head h uses key head h // group
    scores = torch.matmul(rows, key.transpose(2, 3)).view(batch, heads, queries, keys) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :keys]
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.view(batch, kv_heads, -1, keys), value).view(batch, heads, queries, head_dim)
    return output.transpose(1, 2).contiguous(), weights


_GROUPED_EQUAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _grouped_attention_equal(root: "torch.nn.Module") -> bool:
    """Whether `root` (an HF model, possibly holding bridge components) has grouped-query eager
    attention and gives the same logits (≤ 1e-4 of their scale) with `_grouped_eager_attention`
    as with transformers' own eager attention on a 12-token input: checked once per model, so
    an architecture whose eager attention does more than the standard one (attention sinks,
    other masks) keeps transformers' path. Not while a hook that could act is on the model's HF
    modules (False, not remembered)."""
    if root in _GROUPED_EQUAL:
        return _GROUPED_EQUAL[root]
    if acting_hooks(list(_unwrapped(root, halves=False, grouped=False).modules())):
        return False  # the check would feed a user's hooks random tokens: not now, and not remembered
    equal = False
    if any(_groups_queries(module) for module in root.modules()):
        vocab = getattr(getattr(root, "config", None), "vocab_size", None) or getattr(
            getattr(getattr(root, "config", None), "text_config", None), "vocab_size", None)
        try:
            ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
            device = next(root.parameters()).device
            with torch.inference_mode():
                plain = _unwrapped(root, halves=False, grouped=False)(input_ids=ids.to(device), use_cache=False).logits
                regrouped = _unwrapped(root, halves=False, grouped=True)(input_ids=ids.to(device), use_cache=False).logits
            equal = bool((regrouped - plain).abs().max() <= 1e-4 * plain.abs().max().clamp_min(1))
        except Exception:  # noqa: BLE001 - an architecture this check cannot run keeps transformers' path
            equal = False
    _GROUPED_EQUAL[root] = equal
    return equal


class _SingleRowLinear(torch.nn.Linear):
    """`nn.Linear` whose one-row products (a decoding step) run as a batched matrix product over
    the two halves of the weight. Decoding is bound by reading the weights, and on some CPUs
    MKL's matrix–vector kernel streams row-major float32 weights from memory on one thread
    (~10 GB/s on the 2-core machine this was written on) where its batched product over two
    halves reads with both (~19 GB/s, against ~20 GB/s for a plain `sum` over the same weights);
    on others (or another torch/MKL build, other thread settings) it does not. So the swap is
    checked at first use for each model and thread count (`_halves_win`): it is kept only where
    it gives the same products (≤ 1e-5 of the output's scale) and a pass over all the model's
    weights is at least 10% faster, measured on this machine; otherwise every layer stays
    `nn.Linear`. Same weights, no copy. Other inputs take `nn.Linear`'s path."""

    one_row_halves = True  # what `mechvis.lean_decoding._product` reproduces for one-row inputs

    @staticmethod
    def suits(linear: torch.nn.Linear) -> bool:
        weight = linear.weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape[0] % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != self.in_features or x.dtype != torch.float32:
            return super().forward(x)
        return _halves_product(self.weight, x, self.bias)


def _halves_product(weight: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    out_features, in_features = weight.shape
    halves = weight.view(2, out_features // 2, in_features)
    # x as a column whose stride is in_features: this layout takes MKL's fast batched kernel
    # (`_column`, which lean decoding steps lay out once per shared input: one definition).
    y = torch.bmm(halves, _column(x)).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


_KERNEL_CHOICE: dict[tuple, bool] = {}


def _halves_win(root: "torch.nn.Module", repeats: int = 3) -> bool:
    """Whether the halves product gives the same one-row products as `F.linear` (≤ 1e-5 of the
    output's scale, for every weight shape) and a pass over every suitable weight of `root` in
    module order — what one decoding step reads — is at least 10% faster (median of `repeats`
    interleaved passes). Timing the model's own weights in order matters: a decoding step streams
    them from memory, and a product timed on one weight over and over runs from cache, where
    the one-thread matrix–vector kernel looks fast (it was: 2 of the embedded model's 5 shapes
    chose halves that way, all 5 win when streamed, 23 vs 40 ms per pass). Measured once per
    set of weight shapes and thread count per process."""
    import time
    from collections import Counter

    weights = [module.weight.detach() for module in root.modules()
               if type(module) is torch.nn.Linear and _SingleRowLinear.suits(module)]
    if not weights:
        return False
    key = (tuple(sorted(Counter(tuple(weight.shape) for weight in weights).items())), torch.get_num_threads())
    if key in _KERNEL_CHOICE:
        return _KERNEL_CHOICE[key]
    generator = torch.Generator().manual_seed(0)
    inputs = {width: torch.randn(1, 1, width, generator=generator) for width in {weight.shape[1] for weight in weights}}
    with torch.inference_mode():
        equal = True
        for weight in {tuple(weight.shape): weight for weight in weights}.values():
            x = inputs[weight.shape[1]]
            reference = torch.nn.functional.linear(x, weight)
            equal &= bool((_halves_product(weight, x, None) - reference).abs().max() <= 1e-5 * reference.abs().max().clamp_min(1))
        passes = {"linear": lambda weight, x: torch.nn.functional.linear(x, weight), "halves": lambda weight, x: _halves_product(weight, x, None)}
        timings: dict[str, list[float]] = {name: [] for name in passes}
        for repeat in range(repeats + 1):
            for name, product in passes.items():
                start = time.perf_counter()
                for weight in weights:
                    product(weight, inputs[weight.shape[1]])
                if repeat:  # the first pass of each warms up
                    timings[name].append(time.perf_counter() - start)
    median = {name: sorted(values)[len(values) // 2] for name, values in timings.items()}
    _KERNEL_CHOICE[key] = wins = equal and median["halves"] <= 0.9 * median["linear"]
    return wins


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
    return _analysed_trace(model, encoded, continuation_ids, None, None, None, SamplingSettings(temperature=1.0), names_filter)


def _analysed_trace(
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
        from transformer_lens import ActivationCache

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
