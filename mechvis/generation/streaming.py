"""`stream_generate` and `generate`: HF's KV-cached decoding with events per token and the
recorders plugged into it (`mechvis.generation.recorders`), then one teacher-forced analysis pass."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from mechvis._deprecation import deprecated
from mechvis._validation import (
    check_bool,
    check_model,
    check_names_filter,
    integer,
    shown,
)
from mechvis.errors import InvalidArgumentError
from mechvis.generation.decoding.cache import preallocated_cache
from mechvis.generation.decoding.decoder import decoding_model
from mechvis.generation.recorders import (
    MonitorRecorder,
    MonitorTemperatureRecorder,
    ProcessLogits,
    Recorder,
    checked_recorders,
    decode_hooks,
)
from mechvis.generation.sampling import (
    CheckedProcessor,
    SamplingSettings,
    ScoresRecorder,
    checked_processors,
    neutral_generation_config,
    sampled_distributions,
    sampling_processors,
)
from mechvis.generation.schedules import (
    MonitorTemperature,
    ScheduledTemperature,
    scores_entropy,
)
from mechvis.generation.trace import (
    PromptEvent,
    TextDeltas,
    TokenEvent,
    Trace,
    analysed_trace,
    eos_ids,
)
from mechvis.images import encode_with_image
from mechvis.text import encode, str_tokens_of
from mechvis.types import Prompt

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class _Cancelled(Exception):
    """Raised inside the decoding thread when the consumer stops iterating."""


_SAMPLING_KEYWORDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
                      "temperature_schedule": "schedule"}


def _from_deprecated(function: str, sampling: object, recorders: object, legacy: dict) -> tuple[object, object]:
    """`sampling` and `recorders` with the deprecated keywords of `legacy` (temperature, top_k,
    top_p, min_p, seed, temperature_schedule, logits_processors) turned into them, each with a
    warning naming the new form.

    Raises:
        TypeError: an unknown keyword (as Python's own message).
        InvalidArgumentError: sampling= together with the old keywords; bad logits_processors."""
    for name in legacy:
        if name not in _SAMPLING_KEYWORDS and name != "logits_processors":
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    old = {name: value for name, value in legacy.items() if name in _SAMPLING_KEYWORDS}
    if old:
        if sampling is not None:
            raise InvalidArgumentError(f"Pass the sampling settings once: sampling=SamplingSettings(...), not also {', '.join(old)}.")
        arguments = ", ".join(f"{_SAMPLING_KEYWORDS[name]}={shown(value, 40)}" for name, value in old.items())
        deprecated(f"{function}({', '.join(f'{name}=...' for name in old)}) is deprecated: pass "
                   f"sampling=SamplingSettings({arguments}) (mechvis.SamplingSettings; the old keywords go in the "
                   f"next release).", stacklevel=4)
        sampling = SamplingSettings(**{_SAMPLING_KEYWORDS[name]: value for name, value in old.items()})
    if "logits_processors" in legacy:
        processors = checked_processors(legacy["logits_processors"])
        deprecated(f"{function}(logits_processors=[...]) is deprecated: pass recorders=[ProcessLogits(processor), ...] "
                   f"(mechvis.generation.ProcessLogits; a KeywordBoost is a recorder itself: recorders=[boost]; the old "
                   f"keyword goes in the next release).", stacklevel=4)
        recorders = [ProcessLogits(checked.processor, index=checked.index) for checked in processors] + list(
            checked_recorders(recorders)
        )
    return sampling, recorders


def _checked_sampling(sampling: object, recorders: object) -> tuple[SamplingSettings, list[Recorder]]:
    """The checked sampling settings (a schedule samples at temperature 1, which it rescales)
    and recorders, `MonitorTemperature`'s recorder last (its temperature follows every other
    logits step).

    Raises:
        InvalidArgumentError: bad settings or recorders."""
    if sampling is None:
        sampling = SamplingSettings()
    if not isinstance(sampling, SamplingSettings):
        raise InvalidArgumentError(f"sampling must be a mechvis.SamplingSettings (or None: greedy); got {shown(sampling)}.")
    if sampling.schedule is not None:  # the schedule sets each step's temperature
        sampling = dataclasses.replace(sampling, temperature=1.0)
    else:
        sampling = dataclasses.replace(sampling)  # validate() normalises a copy, not the caller's value
    sampling.validate()
    plugged = checked_recorders(recorders)
    if isinstance(sampling.schedule, MonitorTemperature):
        plugged.append(MonitorTemperatureRecorder(sampling.schedule))
    return sampling, plugged


def stream_generate(
    model: "TransformerBridge",
    prompt: Prompt,
    *,
    sampling: SamplingSettings | None = None,
    recorders: Sequence[Recorder] = (),
    chat: bool = False,
    max_new_tokens: int = 64,
    image: object | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    top_n: int = 10,
    analysis_pass: bool = True,
    fit_context: bool = False,
    **deprecated_keywords,
) -> Iterator["PromptEvent | TokenEvent | Trace"]:
    """Generate as `generate` does, yielding a `PromptEvent` (the prompt's tokens) first, a
    `TokenEvent` for each token as soon as it is decoded, then the analysed `Trace` as the
    last item.

    Decoding is HF's KV-cached `generate`, run in a worker thread; the events' values equal the
    trace's (`step_logits`, `step_distributions`, `step_temperatures`) exactly. Closing the
    iterator (or breaking out of a loop over it) cancels decoding: the step running finishes,
    no further step starts, no trace is built and no recorder's `finish` is called.
    `trace.stop_reason` is "eos" or "max_new_tokens".

    Args: as `generate`, plus `top_n`, the number of most probable tokens in each event (1–1000),
        and `fit_context`: True decodes a `max_new_tokens` beyond what fits after the prompt
        until the context is full (the prompt event's `max_new_tokens` says how many) instead
        of refusing it.

    Raises:
        InvalidArgumentError: bad settings, a prompt too long for the context (before decoding).
    """
    settings, recorders = _checked_sampling(*_from_deprecated("stream_generate", sampling, recorders, deprecated_keywords))
    model = check_model(model)
    chat = check_bool(chat, "chat")
    analysis_pass = check_bool(analysis_pass, "analysis_pass")
    fit_context = check_bool(fit_context, "fit_context")
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
    room = n_ctx - len(encoded.token_ids)
    if fit_context and 1 <= room < max_new_tokens:
        max_new_tokens = room
    if len(encoded.token_ids) + max_new_tokens > n_ctx:
        raise InvalidArgumentError(
            f"The prompt ({len(encoded.token_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"this model's context of {n_ctx} tokens; lower max_new_tokens to at most "
            f"{n_ctx - len(encoded.token_ids)}."
        )
    prompt_event = PromptEvent(
        token_ids=tuple(encoded.token_ids),
        str_tokens=tuple(str_tokens_of(model, encoded.token_ids)),
        segments=encoded.segments,
        max_new_tokens=max_new_tokens,
    )
    device = model.cfg.device
    prompt_ids = torch.tensor([encoded.token_ids], device=device)
    prompt_length = len(encoded.token_ids)
    tokenizer = model.hf_tokenizer
    events: "queue.Queue[tuple[str, object]]" = queue.Queue()
    cancelled = threading.Event()
    raw, processed = ScoresRecorder(), ScoresRecorder()
    text = TextDeltas(tokenizer)  # also holds the ids decoded so far
    monitor = next((recorder for recorder in reversed(recorders) if isinstance(recorder, MonitorRecorder)), None)
    if isinstance(monitor, MonitorTemperatureRecorder):
        scheduled = monitor.scheduled
    elif settings.schedule is not None:
        schedule = settings.schedule
        scheduled = ScheduledTemperature(lambda ids, scores: schedule.temperature(scores_entropy(scores), ids[:, prompt_length:]))
    else:
        scheduled = None

    def token_event(token_id: int) -> TokenEvent:
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
            monitor_probability=monitor.probabilities[-1] if monitor is not None and monitor.probabilities else None,
        )

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: Tensor) -> None:
            if not self.prompt_seen:  # generate first hands the streamer the prompt
                self.prompt_seen = True
                return
            if cancelled.is_set():
                raise _Cancelled
            event = token_event(int(value.reshape(-1)[0]))
            for recorder in recorders:
                recorder.step(event)
            events.put(("token", event))

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
                for recorder in recorders:
                    recorder.start(model, prompt_event)
                decoder = decoding_model(model, with_image=bool(extra))
                bridge, points, module_hooks = decode_hooks(model, recorders, bridge=decoder is model.original_model)
                if bridge:  # a hook-point hook, an image, or a recorder that needs the bridge
                    decoder = model.original_model
                for module, hook in module_hooks:
                    stack.callback(module.register_forward_hook(hook).remove)
                if points:
                    stack.enter_context(model.hooks(fwd_hooks=points))
                stack.enter_context(neutral_generation_config(decoder))
                steps = [step if isinstance(step, CheckedProcessor) else CheckedProcessor(step, index)  # every result checked
                         for index, step in enumerate(recorder.logits_step for recorder in recorders if recorder.logits_step is not None)]
                if scheduled is not None and not isinstance(monitor, MonitorTemperatureRecorder):
                    steps.append(scheduled)
                processors = [raw, *steps, *sampling_processors(settings), processed]
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
                    prompt_ids, attention_mask=torch.ones_like(prompt_ids), streamer=Streamer(), **extra, **options
                )
            events.put(("done", output))
        except _Cancelled:
            events.put(("cancelled", None))
        except BaseException as error:  # handed to the consumer, raised there
            events.put(("error", error))

    # The caller's context (a `mechvis.config_context` block) applies to the decoding thread.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(decode,), name="mechvis-decode", daemon=True)
    worker.start()
    try:
        yield prompt_event
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
    output = payload
    generated_ids = output.sequences[0, prompt_length:].tolist()
    eos = eos_ids(model)
    trace = analysed_trace(
        model,
        encoded,
        generated_ids,
        step_logits=torch.stack([step[0] for step in output.logits]).float(),
        step_distributions=sampled_distributions(output.scores, settings),
        step_temperatures=torch.tensor(scheduled.temperatures) if scheduled else torch.full((len(generated_ids),), settings.temperature),
        settings=settings,
        names_filter=names_filter,
        extra=extra,
        forward=analysis_pass,
    )
    trace.stop_reason = "eos" if generated_ids and generated_ids[-1] in eos else "max_new_tokens"
    for recorder in recorders:
        recorder.finish(trace)
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
    sampling: SamplingSettings | None = None,
    recorders: Sequence[Recorder] = (),
    chat: bool = False,
    max_new_tokens: int = 64,
    image: object | None = None,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    analysis_pass: bool = True,
    **deprecated_keywords,
) -> Trace:
    """Generate up to `max_new_tokens` (stopping at the model's end-of-sequence token) and analyse:
    `stream_generate` run to the end.

    Sampling is exactly what the arguments say: nothing from the model's shipped
    generation_config changes the distribution (only its end-of-sequence and padding ids are
    used), and no truncation is applied unless asked for.

    Args:
        prompt, chat: as in `mechvis.run` (chat mode uses the model's chat template).
        sampling: how tokens are chosen, `mechvis.SamplingSettings(temperature, top_k, top_p,
            min_p, seed, schedule)`; None is greedy. temperature 0 is greedy, else sampling at
            that temperature; top_k / top_p / min_p truncate the distribution (None = off);
            seed seeds the sampler without touching the global random state; schedule, a
            per-step temperature (EntropyTemperature, RepetitionTemperature or
            MonitorTemperature), replaces the fixed temperature (each step's is in
            `Trace.step_temperatures`).
        recorders: `mechvis.generation.Recorder`s run alongside the decode (hooks, a logits step
            applied before temperature and truncation, callbacks per step): e.g. `MonitorRecorder`,
            `ProcessLogits(f)` for an HF-style processor f(input_ids, scores) → scores,
            `mechvis.interventions.KeywordBoost`. (Hook interventions apply through
            `with mechvis.interventions.intervene(model, ...)` around this call.)
        image: for a vision-language model, the image (as in `mechvis.run`).
        names_filter: hooks to cache in the analysis pass (None: all).
        analysis_pass: False skips the teacher-forced analysis pass: `trace.run` then has the
            tokens and texts, an empty cache and logits of shape (pos, 0) (the step logits are
            kept). For inputs whose full pass would not fit in memory: `mechvis report`'s
            long-context path analyses the tokens with `mechvis.analysis.analyse_long` instead.

    Deprecated keywords (one release): temperature, top_k, top_p, min_p, seed and
    temperature_schedule (pass `sampling=SamplingSettings(...)`), logits_processors (pass
    `recorders=[ProcessLogits(f), ...]`); each warns with `MechvisDeprecationWarning`.

    Long prompts are prefilled in chunks of queries (HF's `prefill_chunk_size`, see
    `_prefill_chunk`) so that eager attention never holds a (heads, N, N) score matrix.

    Raises:
        InvalidArgumentError: bad settings, or a prompt plus max_new_tokens beyond the context.
    """
    sampling, recorders = _from_deprecated("generate", sampling, recorders, deprecated_keywords)
    *_, trace = stream_generate(
        model, prompt, sampling=sampling, recorders=recorders, chat=chat, max_new_tokens=max_new_tokens, image=image,
        names_filter=names_filter, analysis_pass=analysis_pass,
    )
    return trace
