"""mechvis's former hand-written implementations of general algorithms, kept verbatim (only
renamed) so tests and benchmarks can compare the library-based replacements with them on fixed
inputs. Nothing here calls mechvis."""

from __future__ import annotations

import math

import torch


def jensen_shannon_distance(p, q):
    """√(JSD(p, q) / ln 2): a metric in [0, 1] between distributions."""
    p = p.double() / p.double().sum(-1, keepdim=True)
    q = q.double() / q.double().sum(-1, keepdim=True)
    middle = (p + q) / 2
    divergence = 0.5 * (torch.special.xlogy(p, p) - torch.special.xlogy(p, middle)).sum(-1) + 0.5 * (
        torch.special.xlogy(q, q) - torch.special.xlogy(q, middle)
    ).sum(-1)
    return (divergence.clamp_min(0) / math.log(2)).sqrt().float()


def cluster_heads(maps, n_clusters=2):
    """Average-linkage agglomerative clustering on the pairwise JS distance (labels, silhouette)."""
    n = maps.shape[0]
    distance = jensen_shannon_distance(maps[:, None, :], maps[None, :, :]).double()
    clusters = [[i] for i in range(n)]
    while len(clusters) > n_clusters:  # merge the closest pair (average linkage)
        best = min(
            ((a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))),
            key=lambda pair: distance[clusters[pair[0]]][:, clusters[pair[1]]].mean().item(),
        )
        clusters[best[0]] += clusters.pop(best[1])
    labels = [0] * n
    for label, members in enumerate(clusters):
        for member in members:
            labels[member] = label
    return labels, silhouette(distance, labels)


def silhouette(distance, labels):
    labels_t = torch.tensor(labels)
    groups = labels_t.unique()
    if len(groups) < 2:
        return float("nan")
    scores = []
    for i in range(len(labels)):
        own = (labels_t == labels_t[i]) & (torch.arange(len(labels)) != i)
        if not own.any():
            scores.append(0.0)
            continue
        a = distance[i, own].mean().item()
        b = min(distance[i, labels_t == g].mean().item() for g in groups if g != labels_t[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return sum(scores) / len(scores)


def hotspots(q, rows, cols, threshold_factor=3.0):
    """[(cells, mass, centre)] of 4-connected cells above threshold_factor / N, largest mass first."""
    n = rows * cols
    coordinates = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(n, 2).double()
    q = q.double() / q.double().sum()
    hot = q > threshold_factor / n
    seen: set[int] = set()
    found = []
    for start in torch.nonzero(hot).flatten().tolist():
        if start in seen:
            continue
        component, frontier = [], [start]
        seen.add(start)
        while frontier:
            cell = frontier.pop()
            component.append(cell)
            row, col = divmod(cell, cols)
            for d_row, d_col in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                r, c = row + d_row, col + d_col
                neighbour = r * cols + c
                if 0 <= r < rows and 0 <= c < cols and hot[neighbour] and neighbour not in seen:
                    seen.add(neighbour)
                    frontier.append(neighbour)
        weights = q[component]
        centre = (weights @ coordinates[component]) / weights.sum()
        found.append((sorted(component), float(weights.sum()), (float(centre[0]), float(centre[1]))))
    return sorted(found, key=lambda spot: -spot[1])


def auroc(scores, labels):
    scores_t, labels_t = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)
    positives, negatives = int(labels_t.sum()), int((1 - labels_t).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = scores_t.argsort()
    ranks = torch.empty_like(scores_t)
    ranks[order] = torch.arange(1, len(scores_t) + 1, dtype=torch.float64)
    for value in scores_t.unique():
        tied = scores_t == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels_t == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores, labels):
    scores_t, labels_t = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
    if labels_t.sum() == 0:
        return float("nan")
    order = scores_t.argsort(descending=True)
    hits = labels_t[order]
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def fit_logistic(features, labels, l2=1e-2):
    """(mean, std, weights, bias): L2-penalised logistic regression by Newton's method."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    design = torch.cat([(x - mean) / std, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = labels.double()
    theta = torch.zeros(design.shape[1], dtype=x.dtype)
    penalty = torch.full((design.shape[1],), l2, dtype=x.dtype)
    penalty[-1] = 0.0
    for _ in range(50):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (p - y) / len(y) + penalty * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return mean.tolist(), std.tolist(), theta[:-1].tolist(), float(theta[-1])
