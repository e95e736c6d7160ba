"""Deprecated module path, kept for one release: the long-context pass runs the model: mechvis.analysis.longcontext moved to mechvis.studies.longcontext."""

from mechvis._deprecation import moved_module

__getattr__ = moved_module(__name__, "mechvis.studies.longcontext", "the long-context pass runs the model: mechvis.analysis.longcontext moved to mechvis.studies.longcontext")
