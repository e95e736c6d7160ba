"""Deprecated module path, kept for one release: mechvis.unembedding moved to mechvis.models.unembedding."""

import importlib

from mechvis._deprecation import deprecated


def __getattr__(name: str) -> object:
    deprecated("mechvis.unembedding moved to mechvis.models.unembedding; import from there.")
    return getattr(importlib.import_module("mechvis.models.unembedding"), name)
