"""The shard runner: items in shards of K, one Parquet file per analysis and shard, written
atomically; a fingerprint file so a changed sweep never mixes with an old one; resume by skipping
complete shards. Back-ends (local loop, Ray Data) share `ShardWorker`, the callable class of Ray
Data's batch-inference pattern: `__init__` loads the model once, `__call__(batch)` runs shards.

Layout of an output directory:

    fingerprint.json                   what was swept (version, analyses+params, model, weights, dtype, dataset)
    <analysis>/part-00000.parquet      the rows of shard 0 (items 0..K-1), one file per analysis
    summary.json, summary-*.png        written by `write_summary` after the sweep
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from mechvis.errors import InvalidArgumentError, SweepMismatchError
from mechvis.models import embedded_model_dir
from mechvis.sweep.analyses import ANALYSES, resolve
from mechvis.sweep.dataset import check_targets, read_dataset
from mechvis.sweep.ray_backend import run_ray
from mechvis.sweep.shards import FINGERPRINT, ShardWorker, SweepSpec, atomic_write_bytes, written_fingerprint
from mechvis.sweep.summary import write_summary

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class SweepResult:
    out_dir: Path
    n_items: int
    n_shards: int
    shards_run: list[int] = field(default_factory=list)
    shards_skipped: int = 0
    seconds: float = 0.0
    backend: str = "local"


def _our_files(out_dir: Path) -> list[Path]:
    found = [out_dir / FINGERPRINT] if written_fingerprint(out_dir / FINGERPRINT) is not None else []
    for name in ANALYSES:
        folder = out_dir / name
        if folder.is_dir():
            found += sorted(folder.glob("part-*.parquet")) + sorted(folder.glob(".part-*.tmp"))
    return found + sorted(out_dir.glob("summary*")) + sorted(out_dir.glob("sweep-report.html"))


def prepare_output(spec: SweepSpec, *, overwrite: bool) -> dict:
    """Check (or create) the output directory against the sweep's fingerprint.

    Raises:
        SweepMismatchError: the directory holds another sweep (the message lists what differs)
            or parts without a fingerprint; pass overwrite=True or choose another directory.
    """
    out_dir = Path(spec.out_dir)
    blocking = next((parent for parent in (out_dir, *out_dir.parents) if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise InvalidArgumentError(f"The output directory {out_dir} cannot be made: {blocking} is a file, not a directory.")
    fingerprint = spec.fingerprint()
    if overwrite:
        for path in _our_files(out_dir):
            path.unlink()
        for name in ANALYSES:  # an analysis folder the sweep emptied goes too; one holding anything else stays
            folder = out_dir / name
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    existing = out_dir / FINGERPRINT
    holds_results = any(path.name != FINGERPRINT for path in _our_files(out_dir))
    if existing.exists():
        old = written_fingerprint(existing)
        if old is None:
            raise SweepMismatchError(
                f"{existing} is not a fingerprint mechvis wrote (not a JSON object with its keys); mechvis will not "
                f"replace it. Choose another output directory."
            )
        differs = sorted(key for key in set(old) | set(fingerprint) if old.get(key) != fingerprint.get(key))
        if differs and not holds_results:
            # A sweep that failed before finishing any shard: nothing to mix with, start afresh.
            atomic_write_bytes(existing, lambda handle: handle.write(json.dumps(fingerprint, indent=2, sort_keys=True).encode()))
        elif differs:
            raise SweepMismatchError(
                f"{out_dir} holds a different sweep (differs in {', '.join(differs)}); "
                "re-run with --overwrite to start over, or choose another output directory."
            )
    elif holds_results:
        raise SweepMismatchError(f"{out_dir} holds sweep files but no {FINGERPRINT}; use --overwrite or another directory.")
    else:
        atomic_write_bytes(existing, lambda handle: handle.write(json.dumps(fingerprint, indent=2, sort_keys=True).encode()))
    remove_incomplete_parts(spec)
    return fingerprint


def remove_incomplete_parts(spec: SweepSpec) -> None:
    """Delete the ".part-*.tmp" files of writers that did not finish: a crashed run's (before a
    resume) or a killed Ray worker's, whose shard Ray re-ran elsewhere (after the run). A temp file
    is never complete, so nothing is lost; like resuming, this assumes one sweep per folder."""
    for name in spec.analyses:
        folder = Path(spec.out_dir) / name
        for stale in folder.glob(".part-*.tmp") if folder.is_dir() else []:
            stale.unlink(missing_ok=True)


def run_local(spec: SweepSpec, pending: list[int], *, model=None, threads: int | None = None, progress: bool = True) -> None:
    """The local back-end: one process, the model loaded once, a progress bar over items (rate,
    ETA). `threads` sets torch's threads for the sweep (restored after); None keeps them."""

    before = torch.get_num_threads()
    try:
        worker = ShardWorker(spec, model=model, threads=threads)
        total = sum(len(spec.shard_items(index)) for index in pending)
        with tqdm(total=total, desc="sweep", unit="item", disable=not progress) as bar:
            for index in pending:
                worker.run_shard(index, on_item=lambda: bar.update(1))
    finally:
        torch.set_num_threads(before)


def plan_sweep(
    dataset: "str | Path",
    out_dir: "str | Path",
    analyses: Sequence[str],
    *,
    params: dict | None = None,
    model: str | None = None,
    dtype: str = "float32",
    shard_size: int = 8,
    batch: bool = True,
    tokenizer: object | None = None,
) -> SweepSpec:
    """Read and validate everything (dataset, analyses, parameters) without touching a model.

    Items' `target`s, where a chosen analysis reads them, are checked to be one token with
    `tokenizer` (default: the model's, loaded without the weights; if it cannot be loaded the
    check is left to the analysis, whose error names the line too)."""
    if shard_size < 1:
        raise InvalidArgumentError(f"shard_size must be at least 1; got {shard_size}.")
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise InvalidArgumentError(f"dtype must be float32, float64, bfloat16 or float16; got {dtype!r}.")
    chosen = resolve(analyses if isinstance(analyses, str) else list(analyses), params)
    items = read_dataset(dataset)
    for name, analysis_params in chosen.items():
        ANALYSES[name].check(items, analysis_params)
    if any(ANALYSES[name].reads_target for name in chosen) and any(item.target is not None for item in items):
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
        if tokenizer is not None:
            check_targets(items, tokenizer)
    if model is not None and Path(model).is_dir():
        model = Path(model).resolve()  # one directory, however it was spelled
    return SweepSpec(tuple(items), chosen, str(Path(out_dir)), shard_size, str(model) if model is not None else None, dtype, batch)


def _tokenizer_of(model: "str | Path | None") -> object | None:
    """The tokenizer `load_model(model)` would use, without the weights; None if it cannot be
    loaded (loading the model then reports why)."""
    try:
        if model is None:
            model = embedded_model_dir()
        return AutoTokenizer.from_pretrained(str(model))
    except Exception:  # noqa: BLE001 - any failure here is reported by the model load that follows
        return None


def run_sweep(
    dataset: "str | Path",
    out_dir: "str | Path",
    analyses: Sequence[str],
    *,
    params: dict | None = None,
    model: str | None = None,
    dtype: str = "float32",
    shard_size: int = 8,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    summary: bool = True,
    loaded_model: "TransformerBridge | None" = None,
    batch: bool = True,
) -> SweepResult:
    """Run `analyses` over every item of `dataset`, writing Parquet shards to `out_dir`.

    Re-running the same call resumes: complete shards are skipped; a shard interrupted mid-way is
    redone as a whole (its files are replaced atomically), so no row is lost or duplicated.

    Args:
        analyses: names from `ANALYSES` ("lens", "heads", "tokens", "repetition", "image", "ablation").
        params: {analysis: {parameter: value}} overriding each analysis's defaults.
        model: a hub name or local directory; None for the embedded model.
        shard_size: items per shard (the most work a crash can lose).
        backend: "local" (one process) or "ray" (Ray Data actor pool; `address` of the cluster,
            `workers` actors, each with `threads_per_worker` CPUs and torch threads, default 1).
            Locally, `threads_per_worker` sets torch's threads (default: unchanged). Rows are
            bitwise equal across back-ends at equal thread counts; other counts change float
            reductions in the last bits (~1e-7 relative).
        loaded_model: a model already loaded from `model` (local back-end; skips loading).
        batch: text items of a shard with equal token lengths (prompt + continuation) share one
            batched forward pass (`BatchedForwards`; no padding, so rows equal the unbatched
            analysis to float rounding); False runs one forward per item.

    Raises:
        DatasetError, InvalidArgumentError: before any model work.
        SweepMismatchError: `out_dir` holds a different sweep and `overwrite` is False.
    """
    if backend not in ("local", "ray"):
        raise InvalidArgumentError(f"backend must be 'local' or 'ray'; got {backend!r}.")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name} must be at least 1; got {value!r}.")
    spec = plan_sweep(dataset, out_dir, analyses, params=params, model=model, dtype=dtype, shard_size=shard_size, batch=batch,
                      tokenizer=getattr(loaded_model, "hf_tokenizer", None))
    prepare_output(spec, overwrite=overwrite)
    pending = [index for index in range(spec.n_shards) if not spec.complete(index)]
    result = SweepResult(Path(out_dir), len(spec.items), spec.n_shards, pending, spec.n_shards - len(pending), backend=backend)
    start = time.perf_counter()
    if pending:
        if backend == "local":
            run_local(spec, pending, model=loaded_model, threads=threads_per_worker, progress=progress)
        else:
            run_ray(spec, pending, address=address, workers=workers, threads=threads_per_worker or 1, progress=progress)
    missing = [index for index in range(spec.n_shards) if not spec.complete(index)]
    if missing:
        raise RuntimeError(f"Shards {missing} were not written; re-run the same command to resume.")
    remove_incomplete_parts(spec)  # every writer is done: a temp file left now belongs to a killed one
    result.seconds = time.perf_counter() - start
    if summary:
        write_summary(out_dir)
    return result
