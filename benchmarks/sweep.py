"""`mechvis sweep` throughput: the `lens` sweep of the real example sentences on the embedded model,
local (one process) versus Ray with 2 single-thread workers, and the sweep machinery's per-item
overhead versus calling the same analysis in a plain loop (target: ≤ 10 %). Loop and sweep
alternate and the best of 3 rounds counts, so load from other processes affects both alike.
Batching: the `lens` sweep of equal-length prefixes of the same real sentences (16 tokens each),
batched (8 items per forward) versus one forward per item, alternating, best of 2 rounds."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import mechvis
from mechvis.analysis import hooks_for, logit_lens
from mechvis.sweep import plan_sweep, read_dataset, run_sweep
from mechvis.sweep.example import build_example

N_ITEMS = 8  # per round of the overhead comparison
N_RAY = 16
ROUNDS = 3


def _plain_loop(model, items) -> float:
    """The same work without the sweep: teacher-force, logit lens at the answer position."""
    start = time.perf_counter()
    for item in items:
        trace = mechvis.teacher_force(model, item.prompt, item.continuation, names_filter=hooks_for(model, "similarity"))
        lens = logit_lens(trace.run, positions=[trace.prompt_length - 1], target=trace.generated_ids[0], k=3)
        lens.top_probs.tolist()
    return time.perf_counter() - start


N_BATCH = 16
PREFIX_TOKENS = 16


def _batching(model, directory: Path) -> None:
    """items/s of the lens sweep over equal-length sentence prefixes, batched vs unbatched."""
    import json

    from mechvis.sweep.example import real_sentences

    prefixes = []
    for _, sentence in real_sentences():
        ids = model.hf_tokenizer.encode(sentence, add_special_tokens=False)
        text = model.hf_tokenizer.decode(ids[:PREFIX_TOKENS])
        if len(ids) > PREFIX_TOKENS and len(model.hf_tokenizer.encode(text, add_special_tokens=False)) == PREFIX_TOKENS:
            prefixes.append(text)
        if len(prefixes) == N_BATCH:
            break
    dataset = directory / "prefixes.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n" for i, text in enumerate(prefixes)))
    times = {True: [], False: []}
    for round_ in range(2):
        for batch in (True, False):
            result = run_sweep(dataset, directory / f"batch{batch}{round_}", ["lens"], loaded_model=model, shard_size=8,
                               progress=False, summary=False, batch=batch)
            times[batch].append(result.seconds)
            print(f"  round {round_}, {'batched' if batch else 'unbatched'}: {result.seconds:.1f} s", flush=True)
    batched, single = min(times[True]), min(times[False])
    print(f"sweep batching, lens on {len(prefixes)} real sentence prefixes of {PREFIX_TOKENS} tokens (embedded model, "
          f"shards of 8 = one forward each): batched {len(prefixes) / batched:.2f} items/s, unbatched "
          f"{len(prefixes) / single:.2f} items/s, {single / batched:.2f}× (best of 2 alternating rounds)")


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local cluster
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        small = build_example(directory / "small", n_sentences=N_ITEMS, n_paired=0)["text"]
        large = build_example(directory / "large", n_sentences=N_RAY, n_paired=0)["text"]
        items = read_dataset(small)
        model = mechvis.load_model(device="cpu")
        _plain_loop(model, items[:2])  # warm-up
        start = time.perf_counter()
        plan_sweep(small, directory / "unused", ["lens"]).fingerprint()
        fixed = time.perf_counter() - start  # validation + fingerprint (hashing the weights' file)
        loops, sweeps = [], []
        for round_ in range(ROUNDS):
            loops.append(_plain_loop(model, items))
            result = run_sweep(small, directory / f"local{round_}", ["lens"], loaded_model=model, shard_size=4,
                               progress=False, summary=False)
            sweeps.append(result.seconds)
            print(f"  round {round_}: loop {loops[-1]:.1f} s, sweep {sweeps[-1]:.1f} s", flush=True)
        loop, local = min(loops), min(sweeps)
        _batching(model, directory)

        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            boot = time.perf_counter() - start
            distributed = run_sweep(large, directory / "ray", ["lens"], backend="ray", workers=2, shard_size=2,
                                    threads_per_worker=1, progress=False, summary=False)
        finally:
            ray.shutdown()
    print(f"sweep, lens on real sentences, embedded model, best of {ROUNDS} alternating rounds of {N_ITEMS} items:")
    print(f"  plain loop {N_ITEMS / loop:.2f} items/s; sweep (local) {N_ITEMS / local:.2f} items/s; "
          f"per-item overhead {(local / loop - 1) * 100:+.1f}% (target ≤ 10%); fixed cost {fixed:.1f} s (validation, weights hash)")
    print(f"  Ray, 2 workers × 1 thread, {N_RAY} items: {N_RAY / distributed.seconds:.2f} items/s including loading the "
          f"model in each actor (cluster start {boot:.1f} s not counted); Ray / local items/s "
          f"{(N_RAY / distributed.seconds) / (N_ITEMS / local):.2f}×")
