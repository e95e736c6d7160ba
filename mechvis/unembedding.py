"""Deprecated module path, kept for one release: mechvis.unembedding moved to mechvis.models.unembedding."""

from mechvis._deprecation import moved_module

__getattr__ = moved_module(__name__, "mechvis.models.unembedding", "mechvis.unembedding moved to mechvis.models.unembedding")
