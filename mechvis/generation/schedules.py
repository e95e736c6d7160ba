"""Per-step temperature schedules: entropy-based (EDT), loop-breaking from the text, and
loop-breaking from the repetition monitor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from mechvis.errors import InvalidArgumentError
from mechvis.generation.monitor import InductionHeads, RepetitionMonitor, rep_labels

if TYPE_CHECKING:
    pass


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
    `repetition_features` reads from the finished trace, by the same formulas), recorded by
    `mechvis.generation.MonitorRecorder` (its docstring says on which path). The monitor without
    a temperature: `recorders=[MonitorRecorder()]`.

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


class ScheduledTemperature:
    """HF logits processor that divides each step's logits by the temperature `temperature_of`
    (input_ids, scores) gives it, and records that temperature."""

    def __init__(self, temperature_of: Callable[[Tensor, Tensor], Tensor]):
        self.temperature_of = temperature_of
        self.temperatures: list[float] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        temperature = self.temperature_of(input_ids, scores).clamp_min(1e-4)
        self.temperatures.append(float(temperature[0]))  # generate decodes one sequence
        return scores / temperature[:, None].to(scores.dtype)


def scores_entropy(scores: Tensor) -> Tensor:
    log_probs = scores.float().log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1)
