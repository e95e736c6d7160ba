"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all) and print ratios."""

from __future__ import annotations

import sys

from benchmarks import ablation, clustering, generation, loading, longcontext, metrics, sweep, vision_memory, webapp

BENCHMARKS = {"loading": loading.main, "metrics": metrics.main, "generation": generation.main, "ablation": ablation.main,
              "vision_memory": vision_memory.main, "clustering": clustering.main, "sweep": sweep.main, "webapp": webapp.main,
              "longcontext": longcontext.main}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
    for name in chosen:
        BENCHMARKS[name]()
