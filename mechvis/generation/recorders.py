"""The one plug-in protocol of decoding: a `Recorder` is what `stream_generate(...,
recorders=[...])` runs alongside the decode. It may contribute

- forward hooks on the bridge's hook points (`hook_points`),
- forward hooks on the HF modules the bridge wraps (`module_hooks`), which keep decoding on the
  fast path (the HF modules without the bridge; `mechvis.generation.decoding`),
- a logits step f(input_ids, scores) → scores (`logits_step`), applied before the sampling
  settings' temperature and truncation: a recorder whose step changes the scores is a steerer,

and is told of the prompt (`start`), of each decoded token (`step`) and of the analysed trace
(`finish`); what it recorded is its `result`. The repetition monitor (`MonitorRecorder`, and
`MonitorTemperature` through it), `ProcessLogits` (any HF-style logits processor),
`mechvis.interventions.KeywordBoost` and `mechvis.studies.DecodingRows` (attention rows while decoding) are recorders.

Examples:
    >>> from mechvis.generation import Recorder
    >>> class Entropies(Recorder):
    ...     def start(self, model, prompt):
    ...         self.values = []
    ...     def step(self, event):
    ...         self.values.append(event.entropy)
    ...     @property
    ...     def result(self):
    ...         return self.values
    >>> Entropies().logits_step is None  # records only: sampling is unchanged
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechvis._validation import shown
from mechvis.errors import InvalidArgumentError
from mechvis.generation.monitor import InductionHeads, RepetitionMonitor, StreamingFeatures, find_induction_heads
from mechvis.generation.sampling import CheckedProcessor, processor_name
from mechvis.generation.schedules import MonitorTemperature, ScheduledTemperature

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from mechvis.generation.trace import PromptEvent, TokenEvent, Trace

HookPointHooks = list[tuple[str, Callable]]
ModuleHooks = list[tuple[torch.nn.Module, Callable]]


class Recorder:
    """What runs alongside a decode; override the parts needed (every default does nothing).

    Order of calls in `stream_generate`, all in its decoding thread but `finish`:
    `start(model, prompt)` once; then the hooks, registered for the decode and removed after it
    (never active in the teacher-forced analysis pass); per step, the forward pass (hooks fire),
    `logits_step` (recorders' steps in the order given), sampling, then `step(event)`; after
    decoding and analysis, `finish(trace)`. A cancelled stream calls no `finish`.
    """

    logits_step: Callable[[Tensor, Tensor], Tensor] | None = None
    """None, or an HF-style logits processor f(input_ids (1, pos), scores (1, vocab)) → scores
    (1, vocab), applied at each step before temperature and truncation."""

    def start(self, model: "TransformerBridge", prompt: "PromptEvent") -> None:
        """Called once before decoding, with the prompt's tokens and segments."""

    def hook_points(self, model: "TransformerBridge") -> HookPointHooks:
        """(hook name, hook) pairs, as `model.hooks(fwd_hooks=...)` takes them, for a decode
        through the bridge."""
        return []

    def module_hooks(self, model: "TransformerBridge", *, bridge: bool) -> ModuleHooks | None:
        """(module, forward hook) pairs on the HF modules. `bridge` says whether the decode runs
        through the bridge (then `hook_points` are registered too). With `bridge=False`, None
        means that this recorder needs the bridge: the decode then goes through it (~3× slower
        per step on the embedded model). Default: none, and the bridge when `hook_points` has any."""
        return None if not bridge and self.hook_points(model) else []

    def step(self, event: "TokenEvent") -> None:
        """Called once per decoded token, before the next step runs."""

    def finish(self, trace: "Trace") -> None:
        """Called with the analysed trace (not when the stream is cancelled)."""

    @property
    def result(self) -> object:
        """What was recorded (None by default)."""
        return None


class ProcessLogits(Recorder):
    """A logits processor f(input_ids, scores) → scores as a recorder (a steerer): e.g.
    `recorders=[ProcessLogits(force_token)]`. The scores it returns are checked: a tensor of
    the shape it was given.

    Examples:
        >>> import torch
        >>> step = ProcessLogits(lambda ids, scores: scores + 1.0)
        >>> step.logits_step(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4)).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """

    def __init__(self, processor: Callable[[Tensor, Tensor], Tensor], *, index: int = 0) -> None:
        if not callable(processor):
            raise InvalidArgumentError(
                f"logits processor {index} is not callable: {shown(processor)}; a processor is f(input_ids, scores) → scores."
            )
        self.processor = processor
        self.logits_step = CheckedProcessor(processor, index)

    def __repr__(self) -> str:
        return f"ProcessLogits({processor_name(self.processor)})"


class MonitorRecorder(Recorder):
    """The repetition monitor while decoding: P(token continues a loop) of each token, from the
    state that produces it (`StreamingFeatures`, the signals `repetition_features` reads from the
    finished trace, by the same formulas). Without an intervention or image, the signals are
    recorded by forward hooks on the HF modules, so decoding keeps the fast path (22–24 tokens/s
    streamed on the embedded model at N ≈ 500, against ~9 through the bridge); otherwise (or when
    the model exposes no eager attention weights) by hook-point hooks through the bridge.

    monitor: None for the weights shipped with mechvis. induction: None to find the heads
    (`find_induction_heads`) at the start of each generation. `result`: the probabilities, one
    per decoded token (each `TokenEvent.monitor_probability`).
    """

    def __init__(self, monitor: RepetitionMonitor | None = None, induction: InductionHeads | None = None) -> None:
        self.monitor, self.induction = monitor, induction
        self.probabilities: list[float] = []

    def start(self, model: "TransformerBridge", prompt: "PromptEvent") -> None:
        self._monitor = self.monitor if self.monitor is not None else RepetitionMonitor.load()
        self.features = StreamingFeatures(
            model,
            self.induction if self.induction is not None else find_induction_heads(model),
            prompt_length=len(prompt.token_ids),
            sinks=prompt.segments.sink_positions,
        )
        self.probabilities = []
        self._logits: Tensor | None = None

    def _keep_logits(self, module: torch.nn.Module, args: tuple, output) -> None:
        self._logits = output.logits[0, -1]  # the model's own, before any logits step

    def hook_points(self, model: "TransformerBridge") -> HookPointHooks:
        return self.features.hooks()

    def module_hooks(self, model: "TransformerBridge", *, bridge: bool) -> ModuleHooks | None:
        keep = [(model.original_model, self._keep_logits)]
        if bridge:
            return keep
        found = self.features.module_hooks(model)
        return None if found is None else [*found, *keep]

    def probability(self, input_ids: Tensor) -> Tensor:
        """P(loop) of the state that just ran (the last of `input_ids`), recorded."""
        probability = self._monitor.probability(self.features.step(input_ids[0], self._logits)[None])
        self.probabilities.append(float(probability.reshape(-1)[0]))
        return probability

    def logits_step(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.probability(input_ids)
        return scores

    @property
    def result(self) -> Tensor:
        return torch.tensor(self.probabilities)


class MonitorTemperatureRecorder(MonitorRecorder):
    """`MonitorTemperature`'s machinery: the monitor, whose logits step divides the scores by
    T = low + (high − low) · P (`scheduled` records each T)."""

    def __init__(self, schedule: MonitorTemperature) -> None:
        super().__init__(schedule.monitor, schedule.induction)
        low, high = schedule.low, schedule.high
        self.scheduled = ScheduledTemperature(
            lambda input_ids, scores: (low + (high - low) * self.probability(input_ids)).to(scores.device)
        )

    def logits_step(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return self.scheduled(input_ids, scores)


def checked_recorders(recorders: object) -> list[Recorder]:
    """`recorders` as a list.

    Raises:
        InvalidArgumentError: not a list/tuple of `Recorder`s (a bare function is named with
            the wrapper to use)."""
    if isinstance(recorders, Recorder):
        raise InvalidArgumentError(f"recorders must be a list of recorders; got one ({type(recorders).__name__}): pass [recorder].")
    if not isinstance(recorders, (list, tuple)):
        raise InvalidArgumentError(f"recorders must be a list of mechvis.generation.Recorder; got {shown(recorders)}.")
    for index, recorder in enumerate(recorders):
        if not isinstance(recorder, Recorder):
            hint = " (wrap a logits processor f as ProcessLogits(f))" if callable(recorder) else ""
            raise InvalidArgumentError(
                f"recorder {index} is not a mechvis.generation.Recorder{hint}: {shown(recorder)}."
            )
    return list(recorders)


def decode_hooks(model: "TransformerBridge", recorders: Sequence[Recorder], bridge: bool) -> tuple[bool, HookPointHooks, ModuleHooks]:
    """Where the decode runs and the recorders' hooks for it: on the HF modules (`bridge`
    False) unless one recorder needs the bridge; then every recorder's hook points and its
    module hooks for a bridged decode. Returns (bridge, hook-point hooks, module hooks)."""
    if not bridge:
        found = [recorder.module_hooks(model, bridge=False) for recorder in recorders]
        if all(hooks is not None for hooks in found):
            return False, [], [hook for hooks in found for hook in hooks]
    points = [hook for recorder in recorders for hook in recorder.hook_points(model)]
    modules = [hook for recorder in recorders for hook in (recorder.module_hooks(model, bridge=True) or [])]
    return True, points, modules
