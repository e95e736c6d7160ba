"""mechvis: look inside language models and vision-language models.

    >>> import mechvis
    >>> model = mechvis.load_model()                      # embedded SmolLM2-135M-Instruct, offline
    >>> result = mechvis.run(model, "The capital of France is")
    >>> result.cache["blocks.0.attn.hook_pattern"].shape  # (batch, head, query, key)
"""

from mechvis.architecture import ArchitectureSummary, inspect_model
from mechvis.errors import MechvisError
from mechvis.generation import SamplingSettings, TokenEvent, Trace, generate, stream_generate, teacher_force
from mechvis.models import load_model
from mechvis.running import Run, Segments, Span, encode, run

__all__ = [
    "ArchitectureSummary",
    "MechvisError",
    "Run",
    "Segments",
    "Span",
    "SamplingSettings",
    "TokenEvent",
    "Trace",
    "encode",
    "generate",
    "stream_generate",
    "inspect_model",
    "load_model",
    "run",
    "teacher_force",
]
