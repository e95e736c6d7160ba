"""A bounded store of analysed runs, by count and by megabytes (oldest evicted first)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StoredRun:
    """One generation as the tabs read it: the Trace (its cache holds only the hooks the tabs
    read, attention patterns in float16; full-vocabulary logits dropped) plus what was streamed."""

    id: str
    trace: Any  # mechvis.Trace
    request: dict
    events: list[dict]  # the streamed token events, as sent
    signals: Any  # mechvis.analysis.TokenSignals over every position (top-N kept)
    step_top: dict  # per generated step: top-N of the raw and of the sampled distribution
    timing: dict
    nbytes: int = 0
    extras: dict = field(default_factory=dict)  # per-run memo (lens, head entropy, ...)


def tensor_bytes(value: Any, seen: set | None = None) -> int:
    """Bytes held by the tensors in `value` (nested dicts/lists), each storage counted once
    (transformer-lens' compatibility aliases such as hook_in/hook_resid_pre share one)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    return 0


class RunStore:
    def __init__(self, *, max_runs: int = 8, max_megabytes: float = 2048.0) -> None:
        self.max_runs = max_runs
        self.max_bytes = int(max_megabytes * (1 << 20))
        self._runs: OrderedDict[str, StoredRun] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, run: StoredRun) -> None:
        with self._lock:
            self._runs[run.id] = run
            while len(self._runs) > self.max_runs or (len(self._runs) > 1 and self.total_bytes > self.max_bytes):
                self._runs.popitem(last=False)

    def get(self, run_id: str) -> StoredRun | None:
        with self._lock:
            return self._runs.get(run_id)

    @property
    def total_bytes(self) -> int:
        return sum(run.nbytes for run in self._runs.values())

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._runs)
