"""How tokens are chosen: `SamplingSettings` (temperature, top-k/p, min-p, seed, schedule) and
the logits processors that apply them, HF's own warpers in the order HF applies them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mechvis._validation import check_integer, check_real, integer, real, shown
from mechvis.errors import InvalidArgumentError
from mechvis.generation.schedules import EntropyTemperature, MonitorTemperature, RepetitionTemperature, TemperatureSchedule

if TYPE_CHECKING:
    pass



@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen (`generate(..., sampling=SamplingSettings(...))`) and were
    (`Trace.settings`). temperature 0 is greedy; top_k / top_p / min_p None are off; a schedule
    sets each step's temperature (the fixed one is then 1)."""

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


def sampled_distributions(scores: Sequence[Tensor], settings: SamplingSettings) -> Tensor:
    processed = torch.stack([step[0] for step in scores]).float()
    if settings.greedy:  # greedy picks the argmax: a one-hot distribution
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


class ScoresRecorder:
    """A logits processor that records the scores it is given (and changes nothing)."""

    def __init__(self) -> None:
        self.latest: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.latest = scores[0].detach().float().clone()
        return scores


def sampling_processors(settings: SamplingSettings) -> list:
    """The truncation and temperature warpers for `settings`, HF's own classes in the order HF's
    `generate` applies them (temperature, top-k, top-p, min-p). mechvis applies them itself so
    that nothing else (a model's shipped generation_config, HF's default top-k of 50) joins in."""

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
def neutral_generation_config(decoder: "torch.nn.Module") -> Iterator["object"]:
    """While active, `decoder.generation_config` is HF's neutral default, keeping only the
    model's end-of-sequence, padding and BOS ids: HF's `generate` fills every setting a call
    leaves unset from the model's generation_config (repetition penalty, beams, banned words,
    top-k ...), which would change the distribution mechvis samples from."""

    shipped = getattr(decoder, "generation_config", None)
    neutral = GenerationConfig(
        **{name: getattr(shipped, name, None) for name in ("eos_token_id", "pad_token_id", "bos_token_id")}
    )
    decoder.generation_config = neutral
    try:
        yield neutral
    finally:
        decoder.generation_config = shipped


class CheckedProcessor:
    """A user's logits processor whose every result is checked: the scores, as a tensor of the
    shape it was given (a processor that returns None or another shape is named in the error)."""

    def __init__(self, processor: Callable[[Tensor, Tensor], Tensor], index: int) -> None:
        self.processor, self.index = processor, index

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        result = self.processor(input_ids, scores)
        if not isinstance(result, Tensor) or result.shape != scores.shape:
            got = f"a tensor of shape {tuple(result.shape)}" if isinstance(result, Tensor) else shown(result, 40)
            raise InvalidArgumentError(
                f"logits processor {self.index} ({processor_name(self.processor)}) returned {got}; a processor "
                f"f(input_ids, scores) must return the scores, a tensor of shape {tuple(scores.shape)}."
            )
        if result.isnan().any():  # −inf masks a token; NaN would be sampled as garbage, silently
            raise InvalidArgumentError(
                f"logits processor {self.index} ({processor_name(self.processor)}) returned NaN scores; "
                "mask a token with -inf instead."
            )
        return result


def processor_name(processor: object) -> str:
    return getattr(processor, "__qualname__", None) or type(processor).__name__


def checked_processors(processors: object) -> list[CheckedProcessor]:
    """`logits_processors` as a list of result-checking wrappers.

    Raises:
        InvalidArgumentError: not a list/tuple of callables (one processor must be in a list)."""
    if callable(processors) and not isinstance(processors, (list, tuple)):
        raise InvalidArgumentError(
            f"logits_processors must be a list of processors; got one ({processor_name(processors)}): pass [processor]."
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
    return [CheckedProcessor(processor, index) for index, processor in enumerate(processors)]
