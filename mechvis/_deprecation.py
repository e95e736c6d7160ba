"""Deprecated aliases: old names that keep working for one release, warn, and name the new one.

A package lists what moved as {old name: "new.module:new_name"} and gets a module `__getattr__`
that imports the new place on first use. The new module is named by a string (importlib), so an
alias never becomes an import from a lower layer to a higher one.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping

from mechvis.errors import MechvisDeprecationWarning


def deprecated(message: str, *, stacklevel: int = 3) -> None:
    """Warn once per call site that something is deprecated (`MechvisDeprecationWarning`)."""
    warnings.warn(message, MechvisDeprecationWarning, stacklevel=stacklevel)


def moved_names(module: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` resolving each old name of `table` to "package.module:name" with a
    warning that names the new import; other names raise AttributeError as usual."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, new_name = table[name].split(":")
        deprecated(f"{module}.{name} moved: use `from {where} import {new_name}` (the old name goes in the next release).")
        return getattr(importlib.import_module(where), new_name)

    return __getattr__
