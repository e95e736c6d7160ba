"""Deprecated module path, kept for one release: input attribution runs the model: mechvis.analysis.attribution moved to mechvis.studies.attribution."""

from mechvis._deprecation import moved_module

__getattr__ = moved_module(__name__, "mechvis.studies.attribution", "input attribution runs the model: mechvis.analysis.attribution moved to mechvis.studies.attribution")
