"""A sweep's storage and its unit of work: the spec and fingerprint, Parquet parts written
atomically, and `ShardWorker`, the callable class every back-end runs (one model load per worker)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import snapshot_download

from mechvis import load_model
from mechvis.errors import InvalidArgumentError
from mechvis.models.embedded import embedded_gguf_path
from mechvis.sweep.analyses import ANALYSES, BatchedForwards, Context, analyse_item, sweep_hooks
from mechvis.sweep.dataset import Item, dataset_hash

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


FINGERPRINT = "fingerprint.json"


_PART = "part-{:05d}.parquet"


def mechvis_version() -> str:
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
        return _hash_files([Path(embedded_gguf_path())])
    directory = Path(model)
    if not directory.is_dir():
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
        if threads is not None:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS; torch reads it only at import
        self.spec = spec
        if model is None:
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
        shards = [int(index) for index in batch["shard"]]
        rows = [self.run_shard(index) for index in shards]
        return {"shard": np.array(shards), "rows": np.array(rows), "pid": np.full(len(shards), os.getpid())}


def written_fingerprint(path: Path) -> dict | None:
    """The fingerprint at `path` if mechvis wrote it (a JSON object with its keys), else None: a
    file of the user's that happens to have the name is not ours to read, replace or delete."""
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and {"mechvis_version", "analyses", "dataset_sha256"} <= set(found) else None


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
