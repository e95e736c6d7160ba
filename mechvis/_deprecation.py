"""Deprecated aliases: old names that keep working for one release, warn, and name the new one.

A package lists what moved as {old name: "new.module:new_name"} and gets a module `__getattr__`
that imports the new place on first use. The new module is named by a string (importlib), so an
alias never becomes an import from a lower layer to a higher one.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping

from mechvis.errors import MechvisDeprecationWarning


def deprecated(message: str, *, stacklevel: int = 3) -> None:
    """Warn once per call site that something is deprecated (`MechvisDeprecationWarning`)."""
    warnings.warn(message, MechvisDeprecationWarning, stacklevel=stacklevel)


def moved_names(module: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` resolving each old name of `table` to "package.module:name" with a
    warning that names the new import; other names raise AttributeError as usual. The first use
    warns and binds the name in the old module, so that `from old import name` (which looks the
    name up twice) warns once; dunder probes of the import machinery never warn.

        >>> import sys, types, warnings
        >>> old = types.ModuleType("old_place")
        >>> old.__getattr__ = moved_names("old_place", {"sqrt": "math:sqrt"})
        >>> sys.modules["old_place"] = old
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     from old_place import sqrt
        >>> sqrt(4.0), [str(w.message) for w in caught]
        (2.0, ['old_place.sqrt moved: use `from math import sqrt` (the old name goes in the next release).'])
    """

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, new_name = table[name].split(":")
        deprecated(f"{module}.{name} moved: use `from {where} import {new_name}` (the old name goes in the next release).")
        value = getattr(importlib.import_module(where), new_name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__


def moved_module(module: str, new: str, message: str) -> Callable[[str], object]:
    """The `__getattr__` of a module that moved as a whole: every public name is looked up in
    `new`, with one warning (`message`) on first use; dunder probes never warn.

    Raises (from the returned function):
        AttributeError: a dunder name, or a name `new` does not have."""

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = importlib.import_module(new)
        if not hasattr(target, name):
            raise AttributeError(f"module {module!r} (moved to {new}) has no attribute {name!r}")
        deprecated(f"{message}; import from there.")
        value = getattr(target, name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
