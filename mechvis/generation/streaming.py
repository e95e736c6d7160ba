"""`stream_generate` and `generate`: HF's KV-cached decoding with events per token, then one
teacher-forced analysis pass."""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from mechvis._validation import check_bool, check_names_filter, integer
from mechvis.errors import InvalidArgumentError
from mechvis.generation.decoding.decoder import _decoder
from mechvis.generation.decoding.cache import preallocated_cache
from mechvis.generation.monitor import RepetitionMonitor, StreamingFeatures, find_induction_heads
from mechvis.generation.sampling import (
    SamplingSettings,
    _checked_processors,
    _neutral_generation_config,
    _Recorder,
    _sampling_processors,
    _step_distributions,
)
from mechvis.generation.schedules import MonitorTemperature, TemperatureSchedule, _entropy, _ScheduledTemperature
from mechvis.generation.trace import TokenEvent, Trace, _analysed_trace, _eos_ids, _TextDeltas
from mechvis.images import encode_with_image
from mechvis.text import encode
from mechvis.types import Encoded, Prompt

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge




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

    # The caller's context (a `mechvis.config_context` block) applies to the decoding thread.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(decode,), name="mechvis-decode", daemon=True)
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
