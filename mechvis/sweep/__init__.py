"""`mechvis sweep`: any analysis over a dataset, resumable on one machine, on Ray across many.

    >>> from mechvis.sweep import run_sweep, read_sweep
    >>> run_sweep("prompts.jsonl", "out/sweep", ["lens", "heads"])          # doctest: +SKIP
    >>> read_sweep("out/sweep", "lens").to_pandas()                        # doctest: +SKIP

Dataset format, Parquet schemas and resume semantics: README, "Sweeps".
"""

from mechvis.sweep.analyses import ANALYSES, Analysis, Context, Forward, analyse_item, forward_pass, register
from mechvis.sweep.dataset import Item, dataset_hash, read_dataset
from mechvis.sweep.runner import SweepResult, plan_sweep, run_sweep
from mechvis.sweep.shards import ShardWorker, SweepSpec, read_sweep
from mechvis.sweep.summary import summarise, write_summary, write_sweep_report

__all__ = [
    "ANALYSES", "Analysis", "Context", "Forward", "Item", "ShardWorker", "SweepResult", "SweepSpec", "analyse_item",
    "dataset_hash", "forward_pass", "plan_sweep", "read_dataset", "read_sweep", "register", "run_sweep", "summarise",
    "write_summary", "write_sweep_report",
]
