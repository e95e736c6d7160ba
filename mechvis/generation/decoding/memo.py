"""One memo of the checks that let a fast path run (`VERIFIED`), and the counts tests read
(`decoding_stats`).

Each fast path is used only where a check at first use found it gives what the code it replaces
gives (and, for the halves product, that it is faster on this machine). The checks and what
their results are remembered for:

- "halves" (`halves.halves_win`): equal to `F.linear` and ≥ 10% faster over the model's weights;
  per set of weight shapes and torch thread count, for the whole process (not per model: the
  result depends on the shapes and the machine, not on the weights' values).
- "grouped" (`decoder._grouped_attention_equal`): a model's logits with the grouped-query eager
  attention equal transformers' eager ones; per model.
- "lean" (`lean.lean_decoding_equal`): lean steps give a model's HF logits; per model and set of
  its module classes and their forwards (`lean.plan_signature`).

A check that cannot run now (a hook that could act is on the model: the check would feed it
random tokens) answers None: the fast path is not used this time, and nothing is remembered.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator


class VerificationMemo:
    """Results of fast-path checks: `verified(path, key, check, model=...)` runs `check` once per
    (path, key) — per `model` when one is given (held weakly: forgotten with the model) — and
    remembers True or False; a check answering None (cannot check now) gives False, unremembered.
    Also counts what the fast paths did (`count`, `counts`), for tests and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shared: dict[tuple, bool] = {}
        self._per_model: "weakref.WeakKeyDictionary[object, dict[tuple, bool]]" = weakref.WeakKeyDictionary()
        self._counts: Counter[str] = Counter()

    def verified(self, path: str, key: Hashable, check: Callable[[], bool | None], *, model: object | None = None) -> bool:
        with self._lock:
            store = self._shared if model is None else self._per_model.setdefault(model, {})
            if (path, key) in store:
                return store[path, key]
        result = check()  # outside the lock: a check runs a model (seconds), other threads go on
        if result is None:
            return False
        with self._lock:
            store[path, key] = bool(result)
        return bool(result)

    def remember(self, path: str, key: Hashable, result: bool, *, model: object | None = None) -> None:
        """Record a check's result without running it (tests: "as if this machine measured ...")."""
        with self._lock:
            store = self._shared if model is None else self._per_model.setdefault(model, {})
            store[path, key] = result

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @contextlib.contextmanager
    def isolated(self) -> Iterator["VerificationMemo"]:
        """Inside the block nothing is remembered from before, and what is checked there is
        forgotten after it (tests that make a check run again)."""
        with self._lock:
            saved = self._shared, self._per_model
            self._shared, self._per_model = {}, weakref.WeakKeyDictionary()
        try:
            yield self
        finally:
            with self._lock:
                self._shared, self._per_model = saved


VERIFIED = VerificationMemo()


def decoding_stats() -> dict[str, int]:
    """What the fast decoding paths have done in this process, by name (a new dict; absent names
    are 0): "lean_steps", the single-token steps computed by `lean` (tests compare it before
    and after a generation to know which path ran).

    Examples:
        >>> from mechvis.generation.decoding import decoding_stats
        >>> decoding_stats().get("lean_steps", 0) >= 0
        True
    """
    return VERIFIED.counts()
