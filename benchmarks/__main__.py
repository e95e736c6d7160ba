"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all) and print ratios."""

from __future__ import annotations

import sys

from benchmarks import (ablation, bridge_memory, clustering, dynamics_memory, generation, limits, loading, longcontext,
                        metrics, report_render, sweep, vision_memory, webapp)

BENCHMARKS = {"loading": loading.main, "bridge_memory": bridge_memory.main, "metrics": metrics.main, "limits": limits.main,
              "generation": generation.main, "ablation": ablation.main, "vision_memory": vision_memory.main,
              "dynamics_memory": dynamics_memory.main, "clustering": clustering.main, "sweep": sweep.main,
              "webapp": webapp.main, "report-render": report_render.main, "longcontext": longcontext.main}

if __name__ == "__main__":
    if sys.argv[1:2] == ["report-render"]:  # optional paths of reports to time alongside the demo report
        report_render.main(sys.argv[2:])
        sys.exit(0)
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
    for name in chosen:
        BENCHMARKS[name]()
