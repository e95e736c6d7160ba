"""Deprecated module path, kept for one release: gradient attribution runs the model: mechvis.analysis.gradients moved to mechvis.studies.gradients."""

from mechvis._deprecation import moved_module

__getattr__ = moved_module(__name__, "mechvis.studies.gradients", "gradient attribution runs the model: mechvis.analysis.gradients moved to mechvis.studies.gradients")
