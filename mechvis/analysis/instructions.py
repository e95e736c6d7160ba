"""Deprecated module path, kept for one release: the instruction check runs the model: mechvis.analysis.instructions moved to mechvis.studies.instructions (semantic_token_spans to mechvis.analysis.spans)."""

import importlib

from mechvis._deprecation import deprecated, moved_module

_moved = moved_module(__name__, "mechvis.studies.instructions", "the instruction check runs the model: mechvis.analysis.instructions moved to mechvis.studies.instructions (semantic_token_spans to mechvis.analysis.spans)")


def __getattr__(name: str) -> object:
    if name in ("semantic_token_spans", "SemanticMatch"):  # pure: these went to mechvis.analysis.spans
        deprecated(f"mechvis.analysis.instructions.{name} moved to mechvis.analysis.spans; import from there.")
        return getattr(importlib.import_module("mechvis.analysis.spans"), name)
    return _moved(name)
