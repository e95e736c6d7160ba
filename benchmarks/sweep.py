"""`mechvis sweep` throughput: the `lens` sweep of the real example sentences on the embedded model,
local (one process) versus Ray with 2 single-thread workers, and the sweep machinery's per-item
overhead versus calling the same analysis in a plain loop (target: ≤ 10 %)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

import mechvis
from mechvis.analysis import hooks_for, logit_lens
from mechvis.sweep import plan_sweep, read_dataset, run_sweep
from mechvis.sweep.example import build_example

N_ITEMS = 24


def _plain_loop(model, items) -> float:
    """The same work without the sweep: teacher-force, logit lens at the answer position."""
    start = time.perf_counter()
    for item in items:
        trace = mechvis.teacher_force(model, item.prompt, item.continuation, names_filter=hooks_for(model, "similarity"))
        lens = logit_lens(trace.run.cache, model, positions=[trace.prompt_length - 1], target=trace.generated_ids[0], k=3)
        lens.top_probs.tolist()
    return time.perf_counter() - start


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local cluster
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        paths = build_example(directory / "data", n_sentences=N_ITEMS, n_paired=0)
        items = read_dataset(paths["text"])
        threads = torch.get_num_threads()
        model = mechvis.load_model(device="cpu")
        _plain_loop(model, items[:3])  # warm-up

        loop = _plain_loop(model, items)
        print(f"  plain loop: {loop:.1f} s", flush=True)
        start = time.perf_counter()
        plan_sweep(paths["text"], directory / "unused", ["lens"]).fingerprint()
        fixed = time.perf_counter() - start  # validation + fingerprint (hashing the weights' file)
        local = run_sweep(paths["text"], directory / "local", ["lens"], loaded_model=model, progress=False, summary=False)
        per_item_overhead = (local.seconds / len(items)) / (loop / len(items)) - 1
        print(f"  local sweep: {local.seconds:.1f} s (fixed cost {fixed:.1f} s)", flush=True)

        torch.set_num_threads(1)
        loop_1 = _plain_loop(model, items)
        torch.set_num_threads(threads)

        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            boot = time.perf_counter() - start
            distributed = run_sweep(paths["text"], directory / "ray", ["lens"], backend="ray", workers=2,
                                    threads_per_worker=1, progress=False, summary=False)
        finally:
            ray.shutdown()
    n = len(items)
    print(f"sweep, lens on {n} real sentences, embedded model ({threads} torch threads):")
    print(f"  plain loop {n / loop:.2f} items/s; sweep (local) {n / local.seconds:.2f} items/s; "
          f"per-item overhead {per_item_overhead * 100:+.1f}% (target ≤ 10%); fixed cost {fixed:.1f} s (validation, weights hash)")
    print(f"  plain loop at 1 thread {n / loop_1:.2f} items/s; Ray 2 workers × 1 thread {n / distributed.seconds:.2f} items/s "
          f"including loading the model in each actor (cluster start {boot:.1f} s not counted); "
          f"ratio Ray / local {local.seconds / distributed.seconds:.2f}×")
