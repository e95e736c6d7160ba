"""The Ray back-end: Ray Data `map_batches` over an actor pool of `ShardWorker`s.

Each actor loads the model once (`num_cpus=1`, `threads` torch threads set inside it: Ray sets
OMP_NUM_THREADS to the actor's CPUs, which torch reads only at import). The unit of work is a
shard: the actor writes the shard's Parquet files itself, atomically, exactly as the local
back-end does, so resume never depends on Ray's checkpointing. On a multi-node cluster the output
directory and the images must be on a filesystem every node sees, and mechvis installed on each.

An actor that dies is restarted and its shard retried (Ray Data's actor pools default to
max_restarts=-1, max_task_retries=-1); a retried shard replaces its files atomically, so rows
appear exactly once.
"""

from __future__ import annotations

from mechvis.errors import InvalidArgumentError
from mechvis.sweep.shards import ShardWorker, SweepSpec


def run_ray(spec: SweepSpec, pending: list[int], *, address: str | None = None, workers: int | None = None,
            threads: int = 1, progress: bool = True) -> None:
    """Run the `pending` shards on a Ray cluster (`address`: "auto", "ray://host:10001", or None
    to use the already-initialised cluster or start a local one); shuts down a cluster it started."""
    try:
        import ray  # the optional `ray` extra
    except ImportError:  # pragma: no cover - the extra is installed here
        raise InvalidArgumentError("The Ray back-end needs Ray: pip install 'mechvis[ray]'.") from None
    if threads < 1:
        raise InvalidArgumentError(f"threads per worker must be at least 1; got {threads}.")
    started = not ray.is_initialized()
    if started:
        # Joining a cluster takes only its address (Ray Client rejects local-only options).
        ray.init(address=address) if address else ray.init(include_dashboard=False, log_to_driver=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # The pool never takes every CPU when another stage might need one (a pool asking for all
        # CPUs starves Ray Data's other tasks: a deadlock measured here), and never more actors
        # than shards.
        size = workers if workers is not None else max(1, cpus // threads - 1) if cpus > threads else 1
        if size < 1:
            raise InvalidArgumentError(f"workers must be at least 1; got {workers}.")
        if size * threads > cpus:
            raise InvalidArgumentError(f"{size} workers × {threads} threads need {size * threads} CPUs; the cluster has {cpus}.")
        size = min(size, len(pending))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        dataset = ray.data.from_items([{"shard": index} for index in pending], override_num_blocks=len(pending))
        results = dataset.map_batches(
            ShardWorker,
            fn_constructor_args=(spec,),
            fn_constructor_kwargs={"threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=threads,
        )
        for _ in results.iter_rows():
            pass
    finally:
        if started:
            ray.shutdown()
