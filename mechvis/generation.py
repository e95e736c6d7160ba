"""`generate`: sample from a hooked model with HF's KV-cached `generate`, then analyse the whole
sequence with ONE teacher-forced forward pass of the bridge (what the model computed step by step).

Generating through the bridge token by token is about 12× slower than HF generate plus one
analysis forward, for the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvis.analysis.repetition import (
    InductionHeads,
    RepetitionMonitor,
    StreamingFeatures,
    find_induction_heads,
    rep_labels,
)
from mechvis.errors import InvalidArgumentError
from mechvis.running import (
    Encoded,
    Prompt,
    Run,
    Segments,
    Span,
    encode,
    encode_with_image,
    offsets_of,
    str_tokens_of,
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
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidArgumentError(f"temperature must be ≥ 0 (0 = greedy); got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InvalidArgumentError(f"top_k must be a positive integer or None; got {self.top_k!r}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1] or None; got {self.top_p!r}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgumentError(f"min_p must be in [0, 1] or None; got {self.min_p!r}.")

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
    `repetition_features` reads from the finished trace, by the same formulas). Its hooks make decoding run through the
    bridge, about 2.4× slower per token on the embedded model.

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

    @property
    def generated_positions(self) -> range:
        return range(self.prompt_length, self.prompt_length + len(self.generated_ids))

    @property
    def sampled_not_argmax(self) -> Int[Tensor, " step"]:
        """1 where the sampled token was not the raw logits' argmax."""
        return (self.step_logits.argmax(-1).cpu() != torch.tensor(self.generated_ids)).long()


def _step_distributions(scores: Sequence[Tensor], settings: SamplingSettings) -> Tensor:
    processed = torch.stack([step[0] for step in scores]).float()
    if settings.greedy:  # greedy picks the argmax: a one-hot distribution
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


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
) -> Trace:
    """Generate up to `max_new_tokens` (stopping at the model's end-of-sequence token) and analyse.

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
    """
    if temperature_schedule is not None:
        temperature = 1.0  # the schedule sets each step's temperature
    settings = SamplingSettings(temperature, top_k, top_p, min_p, seed, temperature_schedule)
    settings.validate()
    extra: dict = {}
    if image is not None:
        encoded, extra = encode_with_image(model, prompt, image, chat=chat)
    else:
        encoded = encode(model, prompt, chat=chat)
    n_ctx = model.cfg.n_ctx
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    if len(encoded.token_ids) + max_new_tokens > n_ctx:
        raise InvalidArgumentError(
            f"The prompt ({len(encoded.token_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"this model's context of {n_ctx} tokens; lower max_new_tokens to at most "
            f"{n_ctx - len(encoded.token_ids)}."
        )
    device = model.cfg.device
    prompt_ids = torch.tensor([encoded.token_ids], device=device)
    tokenizer = model.hf_tokenizer
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=not settings.greedy,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        # Settings not asked for are off, whatever the model's generation_config says.
        temperature=settings.temperature if not settings.greedy else None,
        top_k=settings.top_k if not settings.greedy else None,
        top_p=settings.top_p if not settings.greedy else None,
        min_p=settings.min_p if not settings.greedy else None,
    )
    processors = list(logits_processors)
    # Inference mode: ~3% less per-op overhead in the decoding loop than no_grad.
    with torch.inference_mode(), torch.random.fork_rng(devices=[] if device == "cpu" else None), contextlib.ExitStack() as stack:
        scheduled = None
        if isinstance(temperature_schedule, MonitorTemperature):
            scheduled = stack.enter_context(_monitor_temperature(model, temperature_schedule, encoded))
        elif temperature_schedule is not None:
            prompt_length, schedule = len(encoded.token_ids), temperature_schedule
            scheduled = _ScheduledTemperature(lambda ids, scores: schedule.temperature(_entropy(scores), ids[:, prompt_length:]))
        if scheduled is not None:
            processors.append(scheduled)
        if processors:
            from transformers import LogitsProcessorList

            options["logits_processor"] = LogitsProcessorList(processors)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        output = _decoder(model).generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **extra, **options)
    generated = output.sequences[0, prompt_ids.shape[1] :].tolist()
    return _analysed_trace(
        model,
        encoded,
        generated,
        step_logits=torch.stack([step[0] for step in output.logits]).float(),
        step_distributions=_step_distributions(output.scores, settings),
        step_temperatures=torch.tensor(scheduled.temperatures) if scheduled else torch.full((len(generated),), settings.temperature),
        settings=settings,
        names_filter=names_filter,
        extra=extra,
    )


@contextlib.contextmanager
def _monitor_temperature(
    model: "TransformerBridge", schedule: MonitorTemperature, encoded: Encoded
) -> Iterator[_ScheduledTemperature]:
    """While active, hooks stream the monitor's signals and keep each step's logits (as the model
    returns them, before any logits processor); the processor yielded sets the temperature. The
    hook-point hooks make `_decoder` choose the bridge, whose forward the logits hook observes."""
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
        return (schedule.low + (schedule.high - schedule.low) * loop_probability).to(scores.device)

    handle = model.original_model.register_forward_hook(keep_logits)
    try:
        with model.hooks(fwd_hooks=streaming.hooks()):
            yield _ScheduledTemperature(temperature)
    finally:
        handle.remove()


def _decoder(model: "TransformerBridge") -> "torch.nn.Module":
    """The model HF's KV-cached generate runs. With no hook on any of the bridge's hook points
    (no intervention active), the HF modules the bridge wraps, rebuilt around its components and
    sharing every parameter (hooks on HF modules, like transformers' output capturing, stay),
    with each float32 CPU `nn.Linear` running single-token steps as `_SingleRowLinear` does: the
    same logits up to rounding (≤ 1e-4) in about half the time of HF's own decoding step on the
    embedded model. With a hook-point hook, the bridge itself, so it applies."""
    from transformer_lens.hook_points import HookPoint

    if any(isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks) for module in model.modules()):
        return model.original_model
    return _unwrapped(model.original_model)


def _unwrapped(module: "torch.nn.Module") -> "torch.nn.Module":
    """`module` with every bridge component replaced by the HF module it wraps and every suitable
    `nn.Linear` by a `_SingleRowLinear` (shallow copies where something changes; parameters and
    buffers are shared, nothing is modified)."""
    original = module._modules.get("_original_component")
    if original is not None:
        return _unwrapped(original)
    if type(module) is torch.nn.Linear and _SingleRowLinear.suits(module):
        clone = copy.copy(module)  # shares the parameters and any hooks
        clone.__class__ = _SingleRowLinear
        return clone
    children = {name: None if child is None else _unwrapped(child) for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    object.__setattr__(clone, "_modules", children)
    return clone


class _SingleRowLinear(torch.nn.Linear):
    """`nn.Linear` whose one-row products (a decoding step) run as a batched matrix product over
    the two halves of the weight. Decoding is bound by reading the weights: MKL's matrix–vector
    kernel streams row-major float32 weights at ~15 GB/s on this class of CPU, its batched
    matrix product at ~40 GB/s. Same weights, no copy; each output is still one dot product
    (rounding differs at the 1e-5 level). Other inputs take `nn.Linear`'s path."""

    @staticmethod
    def suits(linear: torch.nn.Linear) -> bool:
        weight = linear.weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape[0] % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != self.in_features or x.dtype != torch.float32:
            return super().forward(x)
        halves = self.weight.view(2, self.out_features // 2, self.in_features)
        # x as a column whose stride is in_features: this layout takes MKL's fast batched kernel.
        column = x.reshape(1, self.in_features).T.expand(2, self.in_features, 1)
        y = torch.bmm(halves, column).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def teacher_force(
    model: "TransformerBridge",
    prompt: Prompt,
    continuation: str,
    *,
    chat: bool = False,
    names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
) -> Trace:
    """A Trace for a given continuation, as if the model had generated it at temperature 1: one
    forward pass; `step_logits` are the logits that predicted each continuation token."""
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
) -> Trace:
    """One teacher-forced forward pass of the bridge over prompt + generated tokens (with the
    image inputs `extra` of a vision-language model). Without observed `step_logits`, the
    teacher-forced ones stand in, with temperature-1 distributions."""
    all_ids = encoded.token_ids + generated
    tokens = torch.tensor(all_ids, device=model.cfg.device)
    extra = with_text_appended(extra or {}, len(generated))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names_filter, **extra)
    generated_strings = str_tokens_of(model, generated)
    offsets = list(encoded.offsets) + offsets_of(generated_strings, len(encoded.text))
    spans = encoded.segments.spans + ((Span("generated", len(encoded.token_ids), len(all_ids)),) if generated else ())
    run = Run(
        text=encoded.text + "".join(generated_strings),
        tokens=tokens,
        str_tokens=str_tokens_of(model, encoded.token_ids) + generated_strings,
        offsets=offsets,
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
