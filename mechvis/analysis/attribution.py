"""Deprecated module path, kept for one release: input attribution runs the model: mechvis.analysis.attribution moved to mechvis.studies.attribution."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("input attribution runs the model: mechvis.analysis.attribution moved to mechvis.studies.attribution; import from there.")
    return getattr(importlib.import_module("mechvis.studies.attribution"), name)
