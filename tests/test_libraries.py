"""The library-based replacements (scipy / scikit-learn) give the former hand-written results
(tests/legacy.py) on fixed inputs, and agree with the libraries called directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from mechvis.generation.monitor import FEATURES, RepetitionMonitor
from mechvis.analysis.repetition import auroc, average_precision
from mechvis.analysis.vision import ImageGrid, cluster_heads, head_distances, hotspots, jensen_shannon_distance, silhouette
from mechvis.errors import InvalidArgumentError
from tests import legacy


def _maps(seed: int, heads: int = 24, cells: int = 36, groups: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.dirichlet(np.full(cells, 0.3), size=groups)
    members = rng.integers(0, groups, heads)
    return torch.from_numpy(0.7 * centres[members] + 0.3 * rng.dirichlet(np.ones(cells), size=heads))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jensen_shannon_distance_equals_the_former_code_and_scipy(seed):
    maps = _maps(seed)
    new = jensen_shannon_distance(maps[:, None], maps[None])
    np.testing.assert_allclose(new.numpy(), legacy.jensen_shannon_distance(maps[:, None], maps[None]).numpy(), atol=1e-6)
    np.testing.assert_allclose(head_distances(maps).numpy(), new.numpy(), atol=1e-6)
    assert new[0, 1].item() == pytest.approx(jensenshannon(maps[0].numpy(), maps[1].numpy(), base=2), abs=1e-6)


@pytest.mark.parametrize(("seed", "k"), [(0, 2), (1, 3), (2, 4), (3, 5)])
def test_cluster_heads_equals_the_former_average_linkage(seed, k):
    maps = _maps(seed)
    new = cluster_heads(maps, n_clusters=k)
    labels, score = legacy.cluster_heads(maps, n_clusters=k)
    assert new.labels == labels  # both numbered by first appearance
    assert new.silhouette == pytest.approx(score, abs=1e-6)  # the former distance was rounded to float32


def test_cluster_heads_chooses_k_by_silhouette_over_layers_and_heads():
    maps = _maps(4, heads=24, groups=3).reshape(2, 12, 36)  # (layer, head, cell)
    clusters = cluster_heads(maps)
    assert clusters.scores and clusters.silhouette == max(clusters.scores.values())
    flat = maps.reshape(24, 36)
    for k, score in clusters.scores.items():
        assert score == pytest.approx(legacy.cluster_heads(flat, n_clusters=k)[1], abs=1e-6)
    assert len(clusters.labels) == 24 and clusters.n_clusters == 3
    cosine = cluster_heads(maps, metric="cosine")
    unit = flat / flat.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(cosine.distance.numpy(), (1 - unit @ unit.T).clamp_min(0).numpy(), atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="metric"):
        cluster_heads(maps, metric="euclid")
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        cluster_heads(-maps)


@pytest.mark.parametrize("seed", [0, 1])
def test_silhouette_equals_the_former_code(seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(15, 2))
    distance = torch.from_numpy(np.linalg.norm(points[:, None] - points[None], axis=-1))
    labels = rng.integers(0, 3, 15).tolist()
    labels[0] = 5  # a singleton cluster scores 0 in both
    assert silhouette(distance, labels) == pytest.approx(legacy.silhouette(distance, labels), abs=1e-12)
    assert silhouette(distance, list(range(15))) == legacy.silhouette(distance, list(range(15))) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hotspots_equal_the_former_flood_fill(seed):
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.dirichlet(np.full(7 * 9, 0.2)))
    grid = ImageGrid(7, 9, tuple(range(63)))
    new = hotspots(q, grid, threshold_factor=1.5)
    old = legacy.hotspots(q, 7, 9, threshold_factor=1.5)
    assert len(new) == len(old) > 1
    for spot, (cells, mass, centre) in zip(new, old):
        assert spot.cells == cells and spot.mass == pytest.approx(mass) and spot.centre == pytest.approx(centre)


def test_diagonal_cells_are_separate_hotspots():
    q = torch.full((9,), 0.01)
    q[0] = q[4] = q[8] = 0.3  # a diagonal: 8-connected would be one region, 4-connected is three
    assert len(hotspots(q, ImageGrid(3, 3, tuple(range(9))), threshold_factor=2.0)) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_average_precision_equal_the_former_code(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=200).tolist()  # continuous: no ties, where both definitions agree exactly
    labels = (rng.random(200) < 0.3).astype(int).tolist()
    assert auroc(scores, labels) == pytest.approx(legacy.auroc(scores, labels), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(legacy.average_precision(scores, labels), abs=1e-12)
    tied = np.round(scores, 0).tolist()  # ties: AUROC counts half in both
    assert auroc(tied, labels) == pytest.approx(legacy.auroc(tied, labels), abs=1e-12)
    assert math.isnan(average_precision(scores, [0] * 200)) and math.isnan(auroc(scores, [1] * 200))


@pytest.mark.parametrize("seed", [0, 1])
def test_monitor_fit_equals_the_former_newton_fit(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(300, len(FEATURES), generator=generator) * torch.linspace(0.5, 3, len(FEATURES))
    labels = (features[:, 5] + features[:, 1] + torch.randn(300, generator=generator) > 0.5).long()
    monitor = RepetitionMonitor.fit(features, labels)
    mean, std, weights, bias = legacy.fit_logistic(features, labels)
    np.testing.assert_allclose(monitor.mean, mean, atol=1e-12)
    np.testing.assert_allclose(monitor.std, std, atol=1e-12)
    np.testing.assert_allclose(monitor.weights, weights, atol=1e-6)
    assert monitor.bias == pytest.approx(bias, abs=1e-6)
    with pytest.raises(InvalidArgumentError, match="both classes"):
        RepetitionMonitor.fit(features, torch.zeros(300, dtype=torch.long))


def test_shipped_weights_give_sklearns_probabilities():
    from sklearn.linear_model import LogisticRegression

    monitor = RepetitionMonitor.load()
    values = torch.randn(50, len(FEATURES), generator=torch.Generator().manual_seed(0)) * torch.tensor(monitor.std) + torch.tensor(monitor.mean)
    model = LogisticRegression()
    model.classes_ = np.array([0, 1])
    model.coef_ = np.array([monitor.weights])
    model.intercept_ = np.array([monitor.bias])
    expected = model.predict_proba(((values.double() - torch.tensor(monitor.mean, dtype=torch.float64)) / torch.tensor(monitor.std, dtype=torch.float64)).numpy())[:, 1]
    np.testing.assert_allclose(monitor.probability(values).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("heads", [5, 200])  # 200 heads: rows shared among threads
def test_head_distances_equal_scipy_jensenshannon_on_every_pair(heads):
    rng = np.random.default_rng(heads)
    maps = rng.dirichlet(np.full(49, 0.5), size=heads)
    maps[1] = maps[0]  # identical maps: distance 0
    maps[2, :20] = 0.0  # zero cells, alone and shared with row 3
    maps[3, 10:30] = 0.0
    maps[4] = np.eye(49)[7]  # one cell
    distance = head_distances(torch.from_numpy(maps * rng.uniform(0.5, 2.0, (heads, 1)))).numpy()  # renormalised
    p = maps / maps.sum(-1, keepdims=True)
    expected = jensenshannon(p[:, None], p[None], base=2, axis=-1)
    np.testing.assert_allclose(distance, np.nan_to_num(expected), atol=1e-6, rtol=0)
    assert distance[0, 1] == pytest.approx(0.0, abs=1e-6) and np.allclose(distance, distance.T)
