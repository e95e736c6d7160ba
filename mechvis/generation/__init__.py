"""Generation: sampling settings, temperature schedules, the streamed decoding loop and its trace.

`generate` / `stream_generate` decode with HF's KV-cached `generate` (through the CPU fast paths of
`mechvis.generation.decoding` where they were checked equal), with `SamplingSettings` and the
recorders plugged in (`Recorder`: hooks, a logits step, callbacks per step), and analyse the
result with one teacher-forced pass of the hooked model (`Trace`).
"""

from mechvis.generation.decoding.decoder import prepare_decoding
from mechvis.generation.monitor import InductionHeads, RepetitionMonitor, StreamingFeatures, find_induction_heads
from mechvis.generation.recorders import MonitorRecorder, ProcessLogits, Recorder
from mechvis.generation.sampling import SamplingSettings
from mechvis.generation.schedules import EntropyTemperature, MonitorTemperature, RepetitionTemperature, TemperatureSchedule
from mechvis.generation.streaming import generate, stream_generate
from mechvis.generation.trace import PromptEvent, TokenEvent, Trace, teacher_force

__all__ = [
    "EntropyTemperature", "InductionHeads", "MonitorRecorder", "MonitorTemperature", "ProcessLogits", "PromptEvent",
    "Recorder", "RepetitionMonitor", "RepetitionTemperature", "SamplingSettings", "StreamingFeatures",
    "TemperatureSchedule", "TokenEvent", "Trace", "find_induction_heads", "generate", "prepare_decoding", "stream_generate", "teacher_force",
]
