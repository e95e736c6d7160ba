"""The Ray back-end on a local 2-CPU cluster started here: rows equal the local back-end's, and a
worker killed mid-run still leaves a complete, duplicate-free sweep. The cluster is shut down and
every process it started is checked gone; token auth is disabled (it would write ~/.ray/auth_token)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mechvis.sweep import read_sweep, run_sweep
from tests.test_sweep import prompts, tiny_dir, write_jsonl  # noqa: F401 - tiny_dir is a fixture

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

AUTH_TOKEN = Path.home() / ".ray" / "auth_token"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs; yields the raylet's psutil.Process."""
    token_existed = AUTH_TOKEN.exists()
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    node = ray._private.worker._global_node
    started = [info.process.pid for infos in node.all_processes.values() for info in infos]
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    seen: set[int] = set(started)
    try:
        yield raylet, seen
    finally:
        seen.update(child.pid for child in raylet.children(recursive=True)) if raylet.is_running() else None
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in seen):
            time.sleep(0.5)
        alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"Ray processes left running after shutdown: {alive}"
        assert token_existed or not AUTH_TOKEN.exists(), "Ray wrote ~/.ray/auth_token"
        assert context is not None


def _workers(raylet) -> list:
    return [p for p in raylet.children(recursive=True) if "MapWorker" in " ".join(_name(p))]


def _name(process) -> list[str]:
    try:
        return process.cmdline() + [process.name()]
    except psutil.Error:
        return []


def test_ray_rows_equal_the_local_back_end(cluster, tiny_dir, tmp_path):
    raylet, seen = cluster
    items = prompts(8, paired=True) + [{"id": "c", "prompt": "Water is", "continuation": " wet"}]
    dataset = write_jsonl(tmp_path / "d.jsonl", items)
    common = dict(model=str(tiny_dir), shard_size=2, threads_per_worker=1, progress=False)
    distributed = run_sweep(dataset, tmp_path / "ray", ["lens", "heads", "tokens"], backend="ray", workers=2, **common)
    seen.update(child.pid for child in raylet.children(recursive=True))
    local = run_sweep(dataset, tmp_path / "local", ["lens", "heads", "tokens"], **common)
    assert distributed.shards_run == local.shards_run == [0, 1, 2, 3, 4]
    for name in ("lens", "heads", "tokens"):
        assert read_sweep(tmp_path / "ray", name).equals(read_sweep(tmp_path / "local", name)), name
    again = run_sweep(dataset, tmp_path / "ray", ["lens", "heads", "tokens"], backend="ray", workers=2, **common)
    assert again.shards_run == [] and again.shards_skipped == 5  # resume is the shard runner's, not Ray's


def test_a_killed_ray_worker_still_gives_every_row_once(cluster, tiny_dir, tmp_path):
    raylet, seen = cluster
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(48))
    out = tmp_path / "ray"
    killed: list[int] = []
    complete_at_kill: list[int] = []

    def kill_one_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((out / "lens").glob("part-*.parquet")):
            time.sleep(0.02)
        workers = _workers(raylet)
        seen.update(worker.pid for worker in workers)
        if workers:
            complete_at_kill.append(len(list((out / "tokens").glob("part-*.parquet"))))
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result = run_sweep(dataset, out, ["lens", "tokens"], model=str(tiny_dir), shard_size=2, backend="ray", workers=2,
                       threads_per_worker=1, progress=False)
    killer.join(timeout=10)
    seen.update(child.pid for child in raylet.children(recursive=True))
    assert killed, "no Ray worker was found to kill"
    assert complete_at_kill[0] < 24, "the kill should land mid-sweep"
    assert result.shards_run == list(range(24))
    lens = read_sweep(out, "lens").to_pandas()
    assert sorted(set(lens["item_id"])) == sorted(f"q{i}" for i in range(48))
    assert not lens.duplicated(["item_id", "layer"]).any()
    tokens = read_sweep(out, "tokens").to_pandas()
    assert not tokens.duplicated(["item_id", "position"]).any()
    local = run_sweep(dataset, tmp_path / "local", ["lens", "tokens"], model=str(tiny_dir), shard_size=2,
                      threads_per_worker=1, progress=False)
    assert local.shards_run == list(range(24))
    assert read_sweep(out, "lens").equals(read_sweep(tmp_path / "local", "lens"))
    assert not list(out.rglob(".*.tmp"))
