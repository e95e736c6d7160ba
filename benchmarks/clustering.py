"""Head clustering: mechvis's cluster_heads (scipy average linkage on a numpy Jensen–Shannon matrix,
k by scikit-learn's silhouette) against the former hand-written merge loop (tests/legacy.py) at 48
heads, then mechvis alone at the study's scale, 32 × 32 = 1,024 heads × 576 cells (LLaVA-1.5's
24 × 24 grid), with the distance matrix and the clustering timed apart."""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform

from mechvis.analysis.vision import cluster_heads, head_distances
from tests import legacy


def _maps(heads: int, cells: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.dirichlet(np.full(cells, 0.3), size=6)
    return torch.from_numpy(0.7 * centres[rng.integers(0, 6, heads)] + 0.3 * rng.dirichlet(np.ones(cells), size=heads))


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    small = _maps(48, 576)
    cluster_heads(small[:8], n_clusters=2)  # imports scipy / scikit-learn outside the timing
    old_time, (old_labels, _) = _timed(lambda: legacy.cluster_heads(small, n_clusters=4))
    new_time, new = _timed(lambda: cluster_heads(small, n_clusters=4))
    assert new.labels == old_labels
    print(f"cluster 48 heads × 576 cells into 4: mechvis {new_time * 1e3:.0f} ms, former merge loop {old_time * 1e3:.0f} ms, "
          f"ratio {old_time / new_time:.0f}×")

    maps = _maps(1024, 576).reshape(32, 32, 576)
    js_time, distance = _timed(lambda: head_distances(maps.reshape(1024, 576)))
    cos_time, _ = _timed(lambda: head_distances(maps.reshape(1024, 576), "cosine"))
    quarter = maps.reshape(1024, 576)[:256].numpy()
    scipy_time, condensed = _timed(lambda: pdist(quarter, "jensenshannon"))
    assert np.allclose(squareform(condensed) / np.sqrt(np.log(2)), distance[:256, :256].numpy(), atol=1e-6)
    print(f"1,024 heads × 576 cells: Jensen–Shannon distances {js_time:.2f} s (numpy, 1,024² / 2 × 576 logarithms; "
          f"scipy pdist on 256 heads {scipy_time:.2f} s, ≈ {16 * scipy_time:.1f} s at 1,024 heads), cosine distances {cos_time:.2f} s")
    total_time, clusters = _timed(lambda: cluster_heads(maps))
    print(f"  clustering with k by silhouette over 2…10: {total_time - js_time:.2f} s after the distances "
          f"(cluster_heads end to end {total_time:.2f} s), chose k = {clusters.n_clusters}, silhouette {clusters.silhouette:.3f}")
