"""A sweep's summary: per-layer (or per-analysis) means over items with 95% confidence intervals,
per-condition paired differences with tests, figures, and an offline HTML page.

Statistics (scipy.stats): each item contributes one value per layer and metric (the mean of its
rows there, e.g. over heads), so items are the unit of replication. The CI of a mean is Student's
t interval (`ttest_1samp(...).confidence_interval()`); paired comparisons match items sharing a
`pair` across two conditions and report the mean difference (b − a) with its t interval, the
paired t-test (`ttest_rel`) and the Wilcoxon signed-rank test (`wilcoxon`) p-values.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from mechvis.sweep.shards import atomic_write_bytes, read_sweep, swept_analyses

# analysis -> (per-layer key or None, metrics summarised)
METRICS = {
    "lens": ("layer", ["top1_prob", "target_prob", "entropy", "kl_from_final"]),
    "heads": ("layer", ["normalised_entropy", "sink_mass", "entropy"]),
    "image": ("layer", ["image_mass", "entropy", "gini", "spatial_variance"]),
    "tokens": (None, ["entropy", "surprisal", "top1_prob"]),
    "repetition": (None, ["probability", "label", "alarm"]),
    "ablation": ("layer", ["effect"]),
}


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), math.nan, math.nan
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return float(values.mean()), float(interval.low), float(interval.high)


def _none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def summarise(out_dir: "str | Path") -> dict:
    """The summary of every analysis of the sweep in `out_dir` (see the module docstring)."""

    summary = {}
    for name in swept_analyses(out_dir):
        key, metrics = METRICS.get(name, (None, []))
        frame = read_sweep(out_dir, name).to_pandas()
        frame["condition"] = frame["condition"].fillna("")
        for metric in metrics:
            frame[metric] = frame[metric].astype(float)
        by = ["item_id", "condition", "pair"] + ([key] if key else [])
        per_item = frame.groupby(by, dropna=False, sort=False)[metrics].mean().reset_index()
        groups = ["condition"] + ([key] if key else [])
        means = []
        for values, group in per_item.groupby(groups, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            for metric in metrics:
                mean, low, high = _mean_ci(group[metric].to_numpy())
                means.append({**dict(zip(groups, values)), "metric": metric, "n": int(group[metric].notna().sum()),
                              "mean": _none(mean), "ci_low": _none(low), "ci_high": _none(high)})
        paired = []
        with_pair = per_item[per_item["pair"].notna()]
        conditions = sorted(set(with_pair["condition"]))
        for a, b in itertools.combinations(conditions, 2):
            left = with_pair[with_pair["condition"] == a].set_index(["pair"] + ([key] if key else []))
            right = with_pair[with_pair["condition"] == b].set_index(["pair"] + ([key] if key else []))
            joined = left[metrics].join(right[metrics], lsuffix="_a", rsuffix="_b", how="inner")
            levels = sorted(set(joined.index.get_level_values(key))) if key else [None]
            for level, metric in itertools.product(levels, metrics):
                rows = joined.xs(level, level=key) if key else joined
                x, y = rows[f"{metric}_a"].to_numpy(), rows[f"{metric}_b"].to_numpy()
                keep = np.isfinite(x) & np.isfinite(y)
                x, y = x[keep], y[keep]
                difference = y - x
                mean, low, high = _mean_ci(difference)
                t_p = stats.ttest_rel(y, x).pvalue if len(x) >= 2 and np.any(difference != difference[0]) else math.nan
                w_p = stats.wilcoxon(y, x).pvalue if len(x) >= 2 and np.any(difference != 0) else math.nan
                paired.append({"a": a, "b": b, **({key: level} if key else {}), "metric": metric, "n_pairs": int(len(x)),
                               "mean_difference": _none(mean), "ci_low": _none(low), "ci_high": _none(high),
                               "ttest_rel_p": _none(t_p), "wilcoxon_p": _none(w_p)})
        summary[name] = {"key": key, "n_items": int(per_item["item_id"].nunique()), "rows": int(len(frame)),
                         "means": means, "paired": paired}
    return summary


def _figure(name: str, entry: dict) -> "Figure | None":
    key = entry["key"]
    if key is None or not entry["means"]:
        return None
    metrics = list(dict.fromkeys(row["metric"] for row in entry["means"]))
    figure = Figure(figsize=(3.6 * len(metrics), 3.0))  # not pyplot: the process's backend stays as it is
    axes = figure.subplots(1, len(metrics), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        rows = [row for row in entry["means"] if row["metric"] == metric]
        for condition in sorted({row["condition"] for row in rows}):
            chosen = sorted((row for row in rows if row["condition"] == condition), key=lambda row: row[key])
            x = [row[key] for row in chosen]
            mean = np.array([np.nan if row["mean"] is None else row["mean"] for row in chosen])
            low = np.array([np.nan if row["ci_low"] is None else row["ci_low"] for row in chosen])
            high = np.array([np.nan if row["ci_high"] is None else row["ci_high"] for row in chosen])
            axis.plot(x, mean, marker="o", markersize=3, label=condition or "(all)")
            axis.fill_between(x, low, high, alpha=0.2)
        axis.set_xlabel(key + (" (0 = embeddings)" if name == "lens" else ""))
        axis.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{name}: mean over items, 95% CI", fontsize=10)
    figure.tight_layout()
    return figure


def write_summary(out_dir: "str | Path") -> dict:
    """Write summary.json and summary-<analysis>.png into `out_dir`; returns the summary."""
    out_dir = Path(out_dir)
    summary = summarise(out_dir)
    atomic_write_bytes(out_dir / "summary.json", lambda handle: handle.write(json.dumps(summary, indent=1).encode()))
    for name, entry in summary.items():
        figure = _figure(name, entry)
        if figure is not None:
            atomic_write_bytes(out_dir / f"summary-{name}.png", lambda handle: figure.savefig(handle, format="png", dpi=110))
    return summary


def _table(rows: list[dict], limit: int = 400) -> str:
    if not rows:
        return "<p>No rows.</p>"
    columns = list(rows[0])

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("—" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows[:limit])
    more = f"<p>{len(rows) - limit} more rows in summary.json.</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def write_sweep_report(out_dir: "str | Path", output: "str | Path | None" = None) -> Path:
    """An offline HTML page of the sweep's summary (tables, figures embedded); returns its path."""
    out_dir = Path(out_dir)
    summary = write_summary(out_dir)
    fingerprint = json.loads((out_dir / "fingerprint.json").read_text())
    parts = [f"<h1>Sweep {html.escape(out_dir.name)}</h1>", "<h2>Fingerprint</h2>",
             _table([{"field": k, "value": json.dumps(v) if isinstance(v, dict) else v} for k, v in fingerprint.items()])]
    for name, entry in summary.items():
        parts.append(f"<h2>{html.escape(name)}</h2><p>{entry['n_items']} items, {entry['rows']} rows.</p>")
        figure = out_dir / f"summary-{name}.png"
        if figure.exists():
            data = base64.b64encode(figure.read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(name)} per layer" src="data:image/png;base64,{data}">')
        parts.append("<h3>Means (95% CI)</h3>" + _table(entry["means"]))
        if entry["paired"]:
            parts.append("<h3>Paired conditions (b − a)</h3>" + _table(entry["paired"]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>mechvis sweep</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = Path(output) if output is not None else out_dir / "sweep-report.html"
    atomic_write_bytes(path, lambda handle: handle.write(page.encode()))
    return path
