"""mechvis: look inside language models and vision-language models.

    >>> import mechvis
    >>> model = mechvis.load_model()                      # embedded SmolLM2-135M-Instruct, offline
    >>> result = mechvis.run(model, "The capital of France is")
    >>> result.cache["blocks.0.attn.hook_pattern"].shape  # (batch, head, query, key)
"""

import os as _os
import sys as _sys

# How torch's OpenMP threads (GNU libgomp) wait between parallel regions. libgomp reads this once,
# when torch loads, so it is set only if torch is not loaded yet and the user set neither variable.
# Its default (spin 300,000 times, or 100 when a process has more OpenMP threads than CPUs, as soon
# as a second thread runs torch: `stream_generate` decodes in one) made decoding 5–10× slower on a
# shared machine, or ~1.5× slower in a thread; never spinning (PASSIVE) pays a wake-up per
# parallel region. 1,000 spins in every case: README "Thread waiting" has the measurements.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["OMP_WAIT_POLICY"], _os.environ["GOMP_SPINCOUNT"] = "ACTIVE", "1000"

from mechvis.config import config, config_context  # noqa: E402
from mechvis.errors import MechvisError  # noqa: E402
from mechvis.generation import PromptEvent, SamplingSettings, TokenEvent, Trace, generate, stream_generate, teacher_force  # noqa: E402
from mechvis.models import load_model  # noqa: E402
from mechvis.models.architecture import ArchitectureSummary, inspect_model  # noqa: E402
from mechvis.running import Run, run  # noqa: E402
from mechvis.text import encode  # noqa: E402
from mechvis.types import Segments, Span  # noqa: E402

__all__ = [
    "ArchitectureSummary",
    "MechvisError",
    "Run",
    "Segments",
    "Span",
    "SamplingSettings",
    "PromptEvent",
    "TokenEvent",
    "Trace",
    "config",
    "config_context",
    "encode",
    "generate",
    "stream_generate",
    "inspect_model",
    "load_model",
    "run",
    "teacher_force",
]
