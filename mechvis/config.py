"""mechvis's one switch board: `config(...)` for the process, `config_context(...)` for a block.

Settings:
    fast_decoding (bool, default True): decode through mechvis's CPU fast paths where each was
        checked equal to the module it replaces (`mechvis.generation.decoding`: the halves
        product, grouped-query attention, lean single-token steps, the preallocated KV cache).
        False: HF's generate runs the plain HF modules the bridge wraps (still without the
        bridge's wrappers), with transformers' own attention and cache.

Where a setting lives (after scikit-learn's `set_config` / `config_context`, which keep the whole
configuration per thread): `config(name=value)` sets the process-wide value, under a lock;
`config_context(name=value)` overrides it for the block in the current context only (a
`contextvars.ContextVar`, so per thread and per asyncio task). A per-thread configuration alone
would not reach the thread that `stream_generate` decodes in, nor a web server's worker threads
(a new thread starts from the defaults); one global changed by `config_context` would let one
request's block change another request's concurrent decoding. `stream_generate` runs its
decoding thread in a copy of the caller's context, so a block around it applies to it.

    >>> import mechvis
    >>> mechvis.config()["fast_decoding"]
    True
    >>> with mechvis.config_context(fast_decoding=False):
    ...     mechvis.config()["fast_decoding"]
    False
    >>> mechvis.config()["fast_decoding"]
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

from mechvis.errors import InvalidArgumentError

_DEFAULTS: dict[str, Any] = {"fast_decoding": True}
_KINDS: dict[str, type] = {"fast_decoding": bool}

_lock = threading.Lock()
_process: dict[str, Any] = dict(_DEFAULTS)
_overrides: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("mechvis_config_overrides", default={})


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    for name, value in settings.items():
        if name not in _DEFAULTS:
            raise InvalidArgumentError(
                f"Unknown mechvis setting {name!r}; the settings are {', '.join(sorted(_DEFAULTS))}."
            )
        if type(value) is not _KINDS[name]:
            raise InvalidArgumentError(
                f"mechvis setting {name!r} takes a {_KINDS[name].__name__}; got {value!r} ({type(value).__name__})."
            )
    return settings


def config(**settings: Any) -> dict[str, Any]:
    """With no argument, the settings in effect here (a new dict: the process-wide values with
    any `config_context` block around this call applied). With arguments, set those settings for
    the whole process (every thread, later `config_context` blocks excepted) and return the
    settings now in effect.

    Raises:
        InvalidArgumentError: an unknown setting name (the message lists the valid ones) or a
            value of the wrong type (`fast_decoding` takes a bool).

    Examples:
        >>> import mechvis
        >>> sorted(mechvis.config())
        ['fast_decoding']
        >>> mechvis.config(fast_decoding=False)["fast_decoding"]
        False
        >>> mechvis.config(fast_decoding=True)["fast_decoding"]
        True
    """
    if settings:
        _checked(settings)
        with _lock:
            _process.update(settings)
    with _lock:
        current = dict(_process)
    current.update(_overrides.get())
    return current


def get(name: str) -> Any:
    """The value of one setting in effect here (what the fast paths read)."""
    overrides = _overrides.get()
    if name in overrides:
        return overrides[name]
    with _lock:
        return _process[name]


@contextlib.contextmanager
def config_context(**settings: Any) -> Iterator[dict[str, Any]]:
    """Use `settings` inside the block (in this thread or asyncio task, and in the decoding thread
    of a `stream_generate` started inside it), then the settings as they were. Yields the
    settings in effect inside the block. Blocks nest; the innermost wins.

    Raises:
        InvalidArgumentError: an unknown setting name or a value of the wrong type (before the
            block runs).

    Examples:
        >>> import mechvis
        >>> with mechvis.config_context(fast_decoding=False) as inside:
        ...     inside["fast_decoding"]
        False
        >>> mechvis.config()["fast_decoding"]
        True
    """
    _checked(settings)
    token = _overrides.set({**_overrides.get(), **settings})
    try:
        yield config()
    finally:
        _overrides.reset(token)
