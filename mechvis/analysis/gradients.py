"""Deprecated module path, kept for one release: gradient attribution runs the model: mechvis.analysis.gradients moved to mechvis.studies.gradients."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("gradient attribution runs the model: mechvis.analysis.gradients moved to mechvis.studies.gradients; import from there.")
    return getattr(importlib.import_module("mechvis.studies.gradients"), name)
