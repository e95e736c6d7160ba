"""First load of the embedded model (GGUF dequantisation + cache) versus a load from the cache."""

from __future__ import annotations

import os
import tempfile
import time

import mechvis


def _timed_load() -> float:
    start = time.perf_counter()
    mechvis.load_model(device="cpu")
    return time.perf_counter() - start


def main() -> None:
    previous = os.environ.get("MECHVIS_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MECHVIS_CACHE"] = cache
        try:
            first = _timed_load()  # converts the GGUF, writes the cache, boots the bridge
            cached = _timed_load()  # verifies and reads the cache, boots the bridge
        finally:
            if previous is None:
                del os.environ["MECHVIS_CACHE"]
            else:
                os.environ["MECHVIS_CACHE"] = previous
    print(f"embedded model load: first (GGUF) {first:.1f} s, cached {cached:.1f} s, ratio {first / cached:.1f}×")
