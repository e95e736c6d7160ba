"""Deprecated module path, kept for one release: mechvis.architecture moved to mechvis.models.architecture."""

from mechvis._deprecation import moved_module

__getattr__ = moved_module(__name__, "mechvis.models.architecture", "mechvis.architecture moved to mechvis.models.architecture")
