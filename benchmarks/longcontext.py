"""Long-context analysis of the embedded model (`mechvis.analysis.analyse_long`: every report metric,
rollout rows for the last query, DLA at the last position) at N = 1,024 / 2,048 / 4,096 / 8,192
tokens of real text: peak resident memory and wall time, each size in its own fresh process, and
how each grows with N (the exponent b of cost ∝ N^b between consecutive sizes).

Peak memory is the kernel's high-water mark of resident memory (VmHWM in /proc/self/status): the
whole process's peak (loading included) is what the target (≤ 4 GB at 8,192) counts; the peak is
then reset after loading (`/proc/self/clear_refs` ← 5) to measure the analysis's own peak and what
it adds over the loaded model. Writes docs/longcontext.json and the log-log figure docs/longcontext.png.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SIZES = (1024, 2048, 4096, 8192)
TARGET_BYTES, TARGET_SECONDS = 4e9, 300.0
_DOCS = Path(__file__).resolve().parents[1] / "docs"

_CHILD = """
import gc, json, sys, time
import torch
import mechvis
from mechvis.studies.longcontext import LongOptions, LongReads, analyse_long, real_text_tokens

def status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no " + field + " in /proc/self/status: peak memory cannot be measured here")

n = int(sys.argv[1])
start = time.perf_counter()
model = mechvis.load_model(device="cpu")
load_seconds = time.perf_counter() - start
tokens = real_text_tokens(model, n)
gc.collect()
load_peak, loaded = status("VmHWM"), status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
if status("VmHWM") > loaded * 1.05 + (64 << 20):
    raise RuntimeError("the resident high-water mark could not be reset; the analysis's own peak is unknown")
start = time.perf_counter()
result = analyse_long(model, tokens, reads=LongReads(queries=[-1]), options=LongOptions(attribution=(int(tokens[-1]), None)), progress=False)
seconds = time.perf_counter() - start
analysis_peak = status("VmHWM")
print(json.dumps({"n": n, "seconds": seconds, "stages": result.seconds, "load_seconds": load_seconds,
                  "load_peak": load_peak, "loaded": loaded, "analysis_peak": analysis_peak,
                  "process_peak": max(load_peak, analysis_peak), "block_size": result.block_size}))
"""


def measure(n: int) -> dict:
    """One size in a fresh process (a process's peak never goes down, so sizes cannot share one)."""
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", _CHILD, str(n)], capture_output=True, text=True, cwd=root,
                               env={**__import__("os").environ, "PYTHONPATH": str(root)}, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {n}-token run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def growth(rows: list[dict], key) -> list[float | None]:
    """b with cost ∝ N^b between each size and the previous one (None for the first)."""
    exponents: list[float | None] = [None]
    for previous, current in zip(rows, rows[1:]):
        exponents.append(math.log(key(current) / key(previous)) / math.log(current["n"] / previous["n"]))
    return exponents


def write_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["n"] for row in rows]
    figure, (memory, time) = plt.subplots(1, 2, figsize=(9, 3.6))
    memory.loglog(sizes, [row["process_peak"] / 1e9 for row in rows], "o-", label="whole process (peak)")
    memory.loglog(sizes, [(row["analysis_peak"] - row["loaded"]) / 1e9 for row in rows], "s-", label="added by the analysis")
    memory.axhline(TARGET_BYTES / 1e9, color="grey", linestyle="--", label="target at 8,192 (4 GB)")
    memory.set_xlabel("tokens")
    memory.set_ylabel("GB (VmHWM)")
    memory.legend(fontsize=8)
    time.loglog(sizes, [row["seconds"] for row in rows], "o-", label="analysis")
    time.axhline(TARGET_SECONDS, color="grey", linestyle="--", label="target at 8,192 (5 min)")
    time.set_xlabel("tokens")
    time.set_ylabel("seconds")
    time.legend(fontsize=8)
    for axis in (memory, time):
        axis.set_xticks(sizes, [f"{n:,}" for n in sizes])
        axis.minorticks_off()
    figure.suptitle("Long-context analysis of SmolLM2-135M (2-core CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(sizes: tuple[int, ...] = SIZES) -> list[dict]:
    import os

    rows = []
    for n in sizes:
        rows.append(measure(n))
        row = rows[-1]
        print(f"  measured {n:>5} tokens: {row['seconds']:.0f} s, process peak {row['process_peak'] / 1e9:.2f} GB "
              f"(loading {row['load_peak'] / 1e9:.2f}, analysis {row['analysis_peak'] / 1e9:.2f} with "
              f"{row['loaded'] / 1e9:.2f} resident after loading); stages {json.dumps(row['stages'])}", flush=True)
    time_growth = growth(rows, lambda row: row["seconds"])
    memory_growth = growth(rows, lambda row: row["analysis_peak"] - row["loaded"])
    print(f"long context: analyse_long on the embedded model ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    print(f"{'tokens':>7} {'seconds':>8} {'b(time)':>8} {'process peak GB':>16} {'loaded GB':>10} {'added GB':>9} {'b(added)':>9}")
    for row, b_time, b_memory in zip(rows, time_growth, memory_growth):
        added = (row["analysis_peak"] - row["loaded"]) / 1e9
        print(f"{row['n']:>7,} {row['seconds']:>8.1f} {'' if b_time is None else f'{b_time:.2f}':>8} "
              f"{row['process_peak'] / 1e9:>16.2f} {row['loaded'] / 1e9:>10.2f} {added:>9.2f} "
              f"{'' if b_memory is None else f'{b_memory:.2f}':>9}")
    last = rows[-1]
    if last["n"] == 8192:
        print(f"target at 8,192: peak {last['process_peak'] / 1e9:.2f} GB (≤ 4), {last['seconds']:.0f} s (≤ 300): "
              f"{'met' if last['process_peak'] <= TARGET_BYTES and last['seconds'] <= TARGET_SECONDS else 'NOT met'}")
    _DOCS.mkdir(exist_ok=True)
    (_DOCS / "longcontext.json").write_text(json.dumps({"load_average": os.getloadavg()[0], "rows": rows}, indent=1) + "\n")
    write_figure(rows, _DOCS / "longcontext.png")
    return rows


if __name__ == "__main__":
    main(tuple(int(n) for n in sys.argv[1:]) or SIZES)
