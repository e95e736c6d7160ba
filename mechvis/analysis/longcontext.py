"""Deprecated module path, kept for one release: the long-context pass runs the model: mechvis.analysis.longcontext moved to mechvis.studies.longcontext."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("the long-context pass runs the model: mechvis.analysis.longcontext moved to mechvis.studies.longcontext; import from there.")
    return getattr(importlib.import_module("mechvis.studies.longcontext"), name)
