"""Image-region metrics against numpy references and maps with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechvis
from mechvis.analysis.vision import (
    ImageGrid,
    cluster_heads,
    hotspots,
    image_attention,
    jensen_shannon_distance,
    region_metrics,
    silhouette,
)
from mechvis.errors import InvalidArgumentError
from tests.reference import hf_attentions

GRID = ImageGrid(4, 6, tuple(range(24)))


def _numpy_metrics(q: np.ndarray, rows: int, cols: int):
    q = q / q.sum()
    n = q.size
    nonzero = q[q > 0]
    entropy = -(nonzero * np.log(nonzero)).sum()
    gini = np.abs(q[:, None] - q[None, :]).sum() / (2 * n * n * q.mean()) / ((n - 1) / n)  # mean absolute difference
    ordered, total, k90 = sorted(q, reverse=True), 0.0, 0
    while total < 0.9 - 1e-12:
        total += ordered[k90]
        k90 += 1
    r, c = np.divmod(np.arange(n), cols)
    centre = np.array([(q * r).sum(), (q * c).sum()])
    variance = (q * ((r - centre[0]) ** 2 + (c - centre[1]) ** 2)).sum()
    return entropy, gini, k90, centre, variance


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10))
def test_metrics_match_numpy(seed, concentration):
    q = np.random.default_rng(seed).dirichlet(np.full(24, concentration / 10))
    metrics = region_metrics(torch.from_numpy(q), GRID)
    entropy, gini, k90, centre, variance = _numpy_metrics(q, 4, 6)
    assert metrics.entropy.item() == pytest.approx(entropy, abs=1e-5)
    assert metrics.normalised_entropy.item() == pytest.approx(entropy / math.log(24), abs=1e-5)
    assert metrics.gini.item() == pytest.approx(gini, abs=1e-5)
    assert metrics.k90.item() == k90
    np.testing.assert_allclose(metrics.centre.numpy(), centre, atol=1e-5)
    assert metrics.spatial_variance.item() == pytest.approx(variance, abs=1e-4)
    assert 0 <= metrics.gini.item() <= 1 + 1e-6 and 1 <= metrics.effective_number.item() <= 24 + 1e-4


@pytest.mark.parametrize(("row", "col"), [(0, 0), (2, 3), (3, 5)])
def test_one_hot_map(row, col):
    q = torch.zeros(24)
    q[row * 6 + col] = 1.0
    metrics = region_metrics(q, GRID)
    assert metrics.centre.tolist() == [row, col]
    assert metrics.spatial_variance.item() == 0 and metrics.entropy.item() == 0
    assert metrics.gini.item() == pytest.approx(1.0) and metrics.k90.item() == 1
    assert metrics.peak_to_mean.item() == pytest.approx(24.0)


def test_uniform_map():
    metrics = region_metrics(torch.full((24,), 1 / 24), GRID)
    assert metrics.normalised_entropy.item() == pytest.approx(1.0)
    assert metrics.k90.item() == math.ceil(0.9 * 24) and metrics.gini.item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.effective_number.item() == pytest.approx(24.0) and metrics.peak_to_mean.item() == pytest.approx(1.0)
    assert metrics.centre.tolist() == pytest.approx([1.5, 2.5])


def test_two_separated_blobs_give_two_hotspots():
    q = torch.full((24,), 0.001)
    for cell in (0, 1, 6):  # top-left blob
        q[cell] = 0.2
    for cell in (17, 23):  # bottom-right blob
        q[cell] = 0.15
    spots = hotspots(q, GRID, threshold_factor=3.0)
    assert [spot.cells for spot in spots] == [[0, 1, 6], [17, 23]]
    assert spots[0].mass > spots[1].mass
    assert spots[1].centre == pytest.approx((2.5, 5.0))  # cells (2, 5) and (3, 5), equal mass
    uniform = hotspots(torch.full((24,), 1 / 24), GRID)
    assert uniform == []  # relative to uniform: a flat map has no hotspot (a percentile rule would find 10%)


def test_jensen_shannon_distance():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert jensen_shannon_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon_distance(p, q).item() == pytest.approx(1.0)
    a, b = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    m = (a + b) / 2
    jsd = 0.5 * (a * np.log(a / m)).sum() + 0.5 * (b * np.log(b / m)).sum()
    assert jensen_shannon_distance(torch.from_numpy(a), torch.from_numpy(b)).item() == pytest.approx(math.sqrt(jsd / math.log(2)), abs=1e-6)


def test_clustering_and_silhouette():
    left = torch.tensor([0.8, 0.1, 0.05, 0.05])
    right = torch.tensor([0.05, 0.05, 0.1, 0.8])
    maps = torch.stack([left, left * 0.9 + 0.025, right, right * 0.9 + 0.025, left])
    clusters = cluster_heads(maps, n_clusters=2)
    assert clusters.labels[0] == clusters.labels[1] == clusters.labels[4] != clusters.labels[2] == clusters.labels[3]
    assert clusters.silhouette > 0.8
    positions = torch.tensor([0.0, 1.0, 10.0, 11.0])
    distance = (positions[:, None] - positions[None, :]).abs()
    assert silhouette(distance, [0, 0, 1, 1]) == pytest.approx((9.5 / 10.5 + 8.5 / 9.5) / 2)
    assert math.isnan(silhouette(distance, [0, 0, 0, 0]))
    with pytest.raises(InvalidArgumentError, match="n_clusters"):
        cluster_heads(maps, n_clusters=6)


def test_image_attention_matches_hf_attentions(tiny):
    model, reference = tiny("llama")
    result = mechvis.run(model, "a b c d e f g h i j k l then the question about the picture is")
    grid = ImageGrid(3, 4, tuple(range(1, 13)))  # stand-in "image" tokens laid out 3 × 4
    queries = [14, 15, 16]
    attention = image_attention(result.cache, grid=grid, query_positions=queries, sink_cells=[0])
    expected = hf_attentions(reference, result.tokens.tolist())[:, :, queries][..., 1:13]
    np.testing.assert_allclose(attention.image_mass.numpy(), expected.sum(-1), atol=1e-5)
    kept = expected.copy()
    kept[..., 0] = 0
    np.testing.assert_allclose(attention.maps.numpy(), kept / kept.sum(-1, keepdims=True), atol=1e-5)
    assert attention.mass_per_layer.shape == (3,) and attention.metrics.k90.shape == (3, 4, 3)
    with pytest.raises(InvalidArgumentError, match="needs 12"):
        ImageGrid(3, 4, (1, 2))
    with pytest.raises(InvalidArgumentError, match="sink cell"):
        image_attention(result.cache, grid=grid, query_positions=queries, sink_cells=[12])
