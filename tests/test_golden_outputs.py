"""Outputs that a reorganisation must not change: the demo report's JSON and an example sweep's rows.

The stored files under tests/data/golden/ were written by the code before the package was
reorganised (issue 24); any later change that moves a number by more than 1e-6 fails here.
Regenerate them only for a deliberate change of results: MECHVIS_WRITE_GOLDEN=1 pytest this file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mechvis.cli import main

GOLDEN = Path(__file__).parent / "data" / "golden"
WRITE = os.environ.get("MECHVIS_WRITE_GOLDEN") == "1"
TOLERANCE = 1e-6
# Fields that name where or when a run happened, not what it computed.
VOLATILE = {"path", "output", "created", "timestamp", "elapsed_s", "seconds", "versions", "host"}


def _compare(got, want, where: str = "$") -> list[str]:
    """Differences between two JSON values: numbers within TOLERANCE (absolute and relative)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}: keys {sorted(set(got) ^ set(want))} differ"] if set(got) != set(want) else []
        for key in sorted(set(got) & set(want)):
            if key not in VOLATILE:
                out += _compare(got[key], want[key], f"{where}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _compare(g, w, f"{where}[{i}]")]
    if isinstance(want, float) or isinstance(got, float):
        if isinstance(got, bool) or isinstance(want, bool) or got is None or want is None:
            return [] if got == want else [f"{where}: {got!r} != {want!r}"]
        if math.isnan(want) and math.isnan(got):
            return []
        return [] if math.isclose(got, want, rel_tol=TOLERANCE, abs_tol=TOLERANCE) else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


@pytest.mark.integration
def test_demo_report_json_is_unchanged(embedded, tmp_path):
    from mechvis.demo import DEMO_PROMPT

    json_path = tmp_path / "demo.json"
    assert main(["report", "--prompt", DEMO_PROMPT, "--chat", "--max-new-tokens", "64",
                 "-o", str(tmp_path / "demo.html"), "--json", str(json_path)]) == 0
    got = json.loads(json_path.read_text())
    stored = GOLDEN / "demo-report.json"
    if WRITE:
        stored.write_text(json.dumps(got, indent=1, sort_keys=True))
    differences = _compare(got, json.loads(stored.read_text()))
    assert not differences, "\n".join(differences[:20])


@pytest.mark.integration
def test_example_sweep_rows_are_unchanged(embedded, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--example", "--example-items", "6", "-o", str(out)]) == 0
    got = {str(path.relative_to(out)): pq.read_table(path).to_pylist() for path in sorted(out.glob("**/*.parquet"))
           if "example-data" not in path.parts}
    assert got, "the sweep wrote no Parquet files"
    stored = GOLDEN / "example-sweep.json"
    if WRITE:
        stored.write_text(json.dumps(got, indent=1, sort_keys=True, default=str))
    want = json.loads(stored.read_text())
    differences = _compare(json.loads(json.dumps(got, default=str)), want)
    assert not differences, "\n".join(differences[:20])
