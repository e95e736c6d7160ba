"""Deprecated module path, kept for one release: the instruction check runs the model: mechvis.analysis.instructions moved to mechvis.studies.instructions (semantic_token_spans to mechvis.analysis.spans)."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("the instruction check runs the model: mechvis.analysis.instructions moved to mechvis.studies.instructions (semantic_token_spans to mechvis.analysis.spans); import from there.")
    if name in ("semantic_token_spans", "SemanticMatch"):
        return getattr(importlib.import_module("mechvis.analysis.spans"), name)
    return getattr(importlib.import_module("mechvis.studies.instructions"), name)
