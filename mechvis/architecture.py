"""Deprecated module path, kept for one release: mechvis.architecture moved to mechvis.models.architecture."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("mechvis.architecture moved to mechvis.models.architecture; import from there.")
    return getattr(importlib.import_module("mechvis.models.architecture"), name)
