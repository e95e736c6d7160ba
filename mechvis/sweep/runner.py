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

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from mechvis.errors import InvalidArgumentError, SweepMismatchError
from mechvis.sweep.analyses import ANALYSES, BatchedForwards, Context, analyse_item, resolve, sweep_hooks
from mechvis.sweep.dataset import Item, check_targets, dataset_hash, read_dataset

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

FINGERPRINT = "fingerprint.json"
_PART = "part-{:05d}.parquet"


def mechvis_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mechvis")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        return "unknown"


def _hash_files(paths: Sequence[Path], root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_hash(model: str | None) -> str:
    """SHA-256 of the model's files: the embedded GGUF for None, every file of a local directory,
    or the hub snapshot in the local cache for a hub name (no download)."""
    if model is None:
        from mechvis.models.embedded import embedded_gguf_path

        return _hash_files([Path(embedded_gguf_path())])
    directory = Path(model)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(model, local_files_only=True))
        except Exception as error:  # noqa: BLE001
            raise InvalidArgumentError(f"Model {model!r} is neither a local directory nor in the hub cache ({error}).") from None
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    return _hash_files(files, directory)


@dataclass(frozen=True)
class SweepSpec:
    """Everything a worker needs: the items, analyses with parameters, where to write, the model."""

    items: tuple[Item, ...]
    analyses: dict[str, dict]
    out_dir: str
    shard_size: int
    model: str | None = None  # None: the embedded model
    dtype: str = "float32"
    batch: bool = True  # text items of equal token length share one forward pass (BatchedForwards)

    @property
    def n_shards(self) -> int:
        return -(-len(self.items) // self.shard_size)

    def shard_items(self, index: int) -> tuple[Item, ...]:
        return self.items[index * self.shard_size : (index + 1) * self.shard_size]

    def part(self, analysis: str, index: int) -> Path:
        return Path(self.out_dir) / analysis / _PART.format(index)

    def complete(self, index: int) -> bool:
        """Whether every analysis of shard `index` has a readable part file (`part_is_readable`):
        a truncated or corrupt one (a disk that filled up, a copy cut short) counts as missing, so
        the shard is redone and its files replaced."""
        return all(part_is_readable(self.part(name, index), ANALYSES[name].schema) for name in self.analyses)

    def fingerprint(self) -> dict:
        return {
            "mechvis_version": mechvis_version(),
            "analyses": self.analyses,
            "model": self.model if self.model is not None else "embedded:SmolLM2-135M-Instruct",
            "weights_sha256": weights_hash(self.model),
            "dtype": self.dtype,
            "dataset_sha256": dataset_hash(self.items),
            "n_items": len(self.items),
            "shard_size": self.shard_size,
            "batch_equal_lengths": self.batch,
        }


def part_is_readable(path: Path, schema: pa.Schema) -> bool:
    """Whether `path` is a Parquet file whose footer reads and whose schema is `schema` (reading
    the footer only: a truncated file has none)."""
    if not path.is_file():
        return False
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False
    return found.remove_metadata().equals(schema.remove_metadata())


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    """Write through `write(handle)` to a temp file named ".<name>.<pid>.<random>.tmp" in the same
    folder, fsync it, rename it over `path` (atomic on POSIX) and fsync the folder: readers see
    the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with temporary.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_table(table: pa.Table, path: Path) -> None:
    atomic_write_bytes(path, lambda handle: pq.write_table(table, handle))


class ShardWorker:
    """Runs whole shards: every analysis on every item of the shard, then one atomic Parquet file
    per analysis. Ray Data's callable class: `__init__` loads the model once (per actor), with
    `threads` torch threads; `__call__({"shard": [...]})` returns {"shard", "rows", "pid"}."""

    def __init__(self, spec: SweepSpec, *, threads: int | None = None, model: "TransformerBridge | None" = None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS; torch reads it only at import
        self.spec = spec
        if model is None:
            from mechvis import load_model

            model = load_model(spec.model, device="cpu", dtype=spec.dtype)
        self.context = Context(model)

    def run_shard(self, index: int, on_item: Callable[[], None] | None = None) -> int:
        """Analyse shard `index` and write its files; returns the number of rows written."""
        parts: dict[str, list[dict[str, list]]] = {name: [] for name in self.spec.analyses}
        items = list(self.spec.shard_items(index))
        model = self.context.model
        batching = BatchedForwards(model, items, sweep_hooks(model, self.spec.analyses)) if self.spec.batch else nullcontext()
        with batching:
            for item in items:
                for name, columns in analyse_item(self.context, item, self.spec.analyses).items():
                    parts[name].append(columns)
                if on_item is not None:
                    on_item()
        rows = 0
        for name, columns in parts.items():
            schema = ANALYSES[name].schema
            merged = {column: [value for part in columns for value in part[column]] for column in schema.names}
            table = pa.Table.from_pydict(merged, schema=schema)
            write_table(table, self.spec.part(name, index))
            rows += table.num_rows
        return rows

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        shards = [int(index) for index in batch["shard"]]
        rows = [self.run_shard(index) for index in shards]
        return {"shard": np.array(shards), "rows": np.array(rows), "pid": np.full(len(shards), os.getpid())}


@dataclass
class SweepResult:
    out_dir: Path
    n_items: int
    n_shards: int
    shards_run: list[int] = field(default_factory=list)
    shards_skipped: int = 0
    seconds: float = 0.0
    backend: str = "local"


def _written_fingerprint(path: Path) -> dict | None:
    """The fingerprint at `path` if mechvis wrote it (a JSON object with its keys), else None: a
    file of the user's that happens to have the name is not ours to read, replace or delete."""
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and {"mechvis_version", "analyses", "dataset_sha256"} <= set(found) else None


def _our_files(out_dir: Path) -> list[Path]:
    found = [out_dir / FINGERPRINT] if _written_fingerprint(out_dir / FINGERPRINT) is not None else []
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
        old = _written_fingerprint(existing)
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
    import torch
    from tqdm.auto import tqdm

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
        from transformers import AutoTokenizer

        if model is None:
            from mechvis.models import embedded_model_dir

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
            from mechvis.sweep.ray_backend import run_ray

            run_ray(spec, pending, address=address, workers=workers, threads=threads_per_worker or 1, progress=progress)
    missing = [index for index in range(spec.n_shards) if not spec.complete(index)]
    if missing:
        raise RuntimeError(f"Shards {missing} were not written; re-run the same command to resume.")
    remove_incomplete_parts(spec)  # every writer is done: a temp file left now belongs to a killed one
    result.seconds = time.perf_counter() - start
    if summary:
        from mechvis.sweep.summary import write_summary

        write_summary(out_dir)
    return result


def read_sweep(out_dir: "str | Path", analysis: str) -> pa.Table:
    """All rows of one analysis of a sweep, in dataset order (shard by shard)."""
    folder = Path(out_dir) / analysis
    if analysis not in ANALYSES:
        raise InvalidArgumentError(f"Unknown analysis {analysis!r}; choose from {sorted(ANALYSES)}.")
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        raise InvalidArgumentError(f"{out_dir} has no rows of {analysis!r}.")
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part, schema=ANALYSES[analysis].schema))
        except (OSError, pa.ArrowException) as error:
            raise InvalidArgumentError(
                f"{part} is not a readable Parquet part of {analysis!r} ({type(error).__name__}: {error}); "
                "re-run the same sweep to redo its shard."
            ) from None
    return pa.concat_tables(tables)


def swept_analyses(out_dir: "str | Path") -> dict[str, dict]:
    """The analyses (with parameters) recorded in a sweep's fingerprint."""
    path = Path(out_dir) / FINGERPRINT
    if not path.is_file():
        raise InvalidArgumentError(f"{out_dir} is no sweep: it has no {FINGERPRINT}.")
    return json.loads(path.read_text())["analyses"]

