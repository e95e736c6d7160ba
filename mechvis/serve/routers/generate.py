"""POST /api/generate: one generation, streamed as server-sent events; POST /api/stop."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from typing import Literal

import anyio
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mechvis import generation
from mechvis.errors import MechvisError
from mechvis.generation import PromptEvent, SamplingSettings, Trace
from mechvis.serve.runs import ablated, store_trace, tab_hooks
from mechvis.serve.state import ServerState, get_state
from mechvis.serve.streaming import token_stream

router = APIRouter(tags=["generation"])


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class GenerateRequest(BaseModel):
    """One generation. Completion mode reads `prompt`; chat mode `messages` (and `system`)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["completion", "chat"] = "completion"
    prompt: str = Field("", max_length=100_000)
    system: str = Field("", max_length=20_000)
    messages: list[Message] = Field(default_factory=list, max_length=200)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0, le=100_000)  # 0 = off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # 0 = off
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    schedule: Literal["off", "entropy", "repetition", "monitor"] = "off"
    image_id: str | None = Field(None, max_length=64, pattern=r"^[0-9a-f]{32}$")
    top_n: int = Field(10, ge=1, le=50)
    ablate: list[tuple[int, int]] = Field(default_factory=list, max_length=4096)  # (layer, head) ablated while generating
    ablate_method: Literal["zero", "mean"] = "zero"


class StopResponse(BaseModel):
    stopping: bool


def request_prompt(body: GenerateRequest) -> object:
    """The prompt a request names: its text (completion), or the system prompt, the messages and
    the new user turn (chat)."""
    if body.mode == "chat":
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            message.model_dump() for message in body.messages
        ]
        if body.prompt:
            messages.append({"role": "user", "content": body.prompt})
        return messages
    return body.prompt


def _prompt_and_options(body: GenerateRequest, state: ServerState) -> tuple[object, dict]:
    prompt = request_prompt(body)
    schedules = {"entropy": generation.EntropyTemperature, "repetition": generation.RepetitionTemperature,
                 "monitor": generation.MonitorTemperature}
    image = None
    if body.image_id is not None:
        image = state.images.get(body.image_id)
        if image is None:
            raise HTTPException(404, "No such image; upload it again.")
    sampling = SamplingSettings(
        temperature=body.temperature, top_k=body.top_k or None, top_p=body.top_p if body.top_p < 1.0 else None,
        min_p=body.min_p or None, seed=body.seed, schedule=schedules[body.schedule]() if body.schedule != "off" else None,
    )
    options = dict(chat=body.mode == "chat", max_new_tokens=body.max_new_tokens, sampling=sampling, image=image, top_n=body.top_n)
    return prompt, options


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _token_payload(event, decode) -> dict:
    """A `mechvis.TokenEvent` as sent (≤ ~2 KB): `p` is the token's raw (temperature-1)
    probability, `p_sampled` its probability under the distribution it was drawn from."""
    return {
        "step": event.step, "position": event.position, "id": event.token_id, "text": event.text,
        "p": math.exp(event.logprob), "p_sampled": event.probability, "rank": event.rank,
        "entropy": event.entropy, "varentropy": event.varentropy, "margin": event.margin,
        "temperature": event.temperature, "top_ids": list(event.top_ids),
        "top_probs": [round(float(p), 6) for p in event.top_probs], "monitor": event.monitor_probability,
        "top_texts": [decode([int(i)]) for i in event.top_ids],
    }


@router.post("/api/generate", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, 409: {"description": "busy"}})
async def generate(body: GenerateRequest, state: ServerState = Depends(get_state)):
    """Stream `start`, one `token` per decoded token, `stopped`, then `analysis` (or `error`).
    `stopped.reason`: eos, max_new_tokens, cancelled, or context (the model's context is full:
    a request for more tokens than fit after the prompt decodes until it is, and `start` says
    how many that is).
    One generation at a time: a second request gets 409 while one runs. A client that goes
    away cancels its generation, which releases the lock."""
    model = state.require_model()
    prompt, options = _prompt_and_options(body, state)
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running; wait for it or stop it.")
    stop = threading.Event()  # /api/stop asks the generator below to close the stream
    state.cancel = stop
    state.status = "generating"
    return _EventStream(_generation_events(model, prompt, options, body, state, stop), lambda: _release(state, stop),
                        media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


def _release(state: ServerState, stop: threading.Event) -> None:
    """The end of generation `stop` (once; later calls do nothing): the server is idle and takes
    the next request."""
    if state.cancel is stop:
        state.status = "idle"
        state.cancel = None
        state.generation_lock.release()


class _EventStream(StreamingResponse):
    """A streaming response that closes its generator however the response ends (a client that
    goes away leaves it suspended at a `yield`, which Starlette does not close), then calls
    `on_close` (also when the generator never started)."""

    def __init__(self, content, on_close, **options) -> None:
        super().__init__(content, **options)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.on_close()


_END = object()


async def _in_thread(function, *args):
    """`function(*args)` in a worker thread: the event loop keeps serving (/api/stop, other routes)."""
    return await anyio.to_thread.run_sync(function, *args)


async def _generation_events(model, prompt, options: dict, body: GenerateRequest, state: ServerState, stop: threading.Event):
    """The server-sent events of one generation: one generator over `stream_generate`'s items
    (the prompt event's tokens are the ones the page shows). Every way a generation ends (the
    trace, /api/stop, the client going away, an error) closes the stream, which cancels
    decoding, and releases the lock before the last event is sent."""
    run_id = uuid.uuid4().hex[:12]
    tokenizer = model.hf_tokenizer
    contexts = contextlib.ExitStack()
    stream = None
    started = time.perf_counter()
    token_times: list[float] = []
    final = None
    try:
        if body.ablate:  # (a mean ablation runs the model for its reference: in a thread too)
            await _in_thread(lambda: contexts.enter_context(ablated(state, body.ablate, body.ablate_method)))
        # fit_context: asked for more than the context holds, decode until it is full, then stop
        # with reason "context" (a prompt that leaves no room is refused by stream_generate).
        stream = await _in_thread(lambda: token_stream(model, prompt, names_filter=tab_hooks(model), fit_context=True, **options))
        events: list[dict] = []
        context_bound = False
        trace = None
        while not stop.is_set():
            item = await _in_thread(next, stream, _END)
            if item is _END:
                break
            if isinstance(item, PromptEvent):
                context_bound = item.max_new_tokens < options["max_new_tokens"]
                # With an image, the page shows the prompt once analysed (one chip for the image tokens).
                texts = None if options["image"] is not None else list(item.str_tokens)
                yield _event("start", {"run": run_id, "prompt_ids": list(item.token_ids), "prompt_tokens": texts,
                                       "max_new_tokens": item.max_new_tokens})
            elif isinstance(item, Trace):
                trace = item
                break
            else:
                token_times.append(time.perf_counter())
                payload = _token_payload(item, tokenizer.decode)
                events.append(payload)
                yield _event("token", payload)
        timing = {
            "time_to_first_token_ms": (token_times[0] - started) * 1000 if token_times else None,
            "ms_per_token": (token_times[-1] - token_times[0]) * 1000 / (len(token_times) - 1) if len(token_times) > 1 else None,
        }
        if trace is None:
            final = ("stopped", {"reason": "cancelled", **timing})
        else:
            reason = trace.stop_reason or (
                "max_new_tokens" if len(trace.generated_ids) >= options["max_new_tokens"] else "eos")
            if reason == "max_new_tokens" and context_bound:
                reason = "context"  # the context is full (the request asked for more)
            yield _event("stopped", {"reason": reason, **timing})
            state.status = "analysing"
            analysed = time.perf_counter()
            stored = await _in_thread(lambda: store_trace(state, run_id, trace, body.model_dump(), events, timing,
                                                          image=options["image"]))
            timing["analysis_ms"] = (time.perf_counter() - analysed) * 1000
            final = ("analysis", {"run": run_id, "n_tokens": len(stored.trace.run.str_tokens), **timing})
    except MechvisError as error:
        final = ("error", {"message": str(error)})
    except Exception as error:  # reported to the page; the server keeps serving
        logging.getLogger("mechvis.serve").exception("generation failed")
        final = ("error", {"message": f"{type(error).__name__}: {error}"})
    finally:
        with anyio.CancelScope(shield=True):  # also when the client went away (the task is cancelled)
            if stream is not None:
                await _in_thread(stream.close)  # the one cancel path: closing the stream stops decoding
            contexts.close()
            _release(state, stop)  # before the last event: a client may send the next request on it
    if final is not None:
        yield _event(*final)


@router.post("/api/stop", response_model=StopResponse)
async def stop(state: ServerState = Depends(get_state)) -> StopResponse:
    """Cancel the running generation (Esc in the page)."""
    cancel = state.cancel
    if cancel is not None:
        cancel.set()
    return StopResponse(stopping=cancel is not None)
