"""Matplotlib figures, one function per figure, each drawing analysis results (never computing
metrics). Token strings are shown as data: math-text parsing is off, newlines shown as ↵.

Each figure is a `matplotlib.figure.Figure` made directly, not through pyplot: importing or
drawing leaves the process's backend and pyplot's figure list alone (nothing to close), and
`figure.savefig(...)` renders with Agg whatever the backend. Jupyter shows a returned figure
(the inline backend's formatter handles `Figure`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib import rc_context
from matplotlib.figure import Figure

from mechvis.analysis.activations import ActivationNorms
from mechvis.analysis.attention import HeadEntropy, Rollout, RolloutRows
from mechvis.analysis.lens import LogitLens
from mechvis.analysis.projection import Projection
from mechvis.analysis.residual import LayerSimilarity, LogitAttribution
from mechvis.analysis.tokens import HighEntropyPositions, TokenSignals


def _np(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a float32 numpy array on the CPU: numpy has no bfloat16, and matplotlib
    needs no gradients nor half floats."""
    return tensor.detach().float().cpu().numpy()


@contextmanager
def _plain_text():
    with rc_context({"text.parse_math": False, "font.size": 8}):
        yield


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """`pyplot.subplots` without pyplot: a new `Figure` and its axes (`Figure.subplots`)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


_SHOWN = {"\n": "↵", "\t": "⇥"}


def display_token(token: str) -> str:
    """A token as a label: newlines and tabs as ↵ and ⇥, other control characters escaped (\\r,
    \\x00), long tokens shortened."""
    shown = "".join(_SHOWN.get(c, repr(c)[1:-1] if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in token)
    return shown if len(shown) <= 14 else shown[:13] + "…"


def _tick_labels(axis, tokens: Sequence[str], *, which: str = "x", step: int | None = None) -> None:
    step = step or max(1, len(tokens) // 60)
    positions = list(range(0, len(tokens), step))
    labels = [display_token(tokens[p]) for p in positions]
    if which == "x":
        axis.set_xticks(positions, labels, rotation=90)
    else:
        axis.set_yticks(positions, labels)


def token_entropy_curve(signals: TokenSignals, tokens: Sequence[str], *, start: int = 0, sort: bool = False) -> Figure:
    """Entropy (nats) of each position's next-token distribution from `start`; sorted descending
    when `sort`."""
    with _plain_text():
        figure, axis = _subplots(figsize=(10, 3))
        entropy = _np(signals.entropy[start:])
        labels = list(tokens[start:])
        if sort:
            order = np.argsort(-entropy)
            entropy, labels = entropy[order], [labels[i] for i in order]
        axis.plot(range(len(entropy)), entropy, marker=".", color="#4c72b0")
        axis.set_ylabel("entropy (nats)")
        axis.set_xlabel("position (sorted by entropy)" if sort else "position")
        _tick_labels(axis, labels)
        figure.tight_layout()
    return figure


def activation_norms_figure(norms: ActivationNorms, tokens: Sequence[str]) -> Figure:
    """Heatmaps: L2 norm per layer × token, and its layer-to-layer relative change."""
    with _plain_text():
        figure, (top, bottom) = _subplots(2, 1, figsize=(10, 6), sharex=True)
        image = top.imshow(_np(norms.norms), aspect="auto", cmap="viridis")
        figure.colorbar(image, ax=top, label=f"‖{norms.kind}‖₂")
        top.set_ylabel("layer")
        change = _np(norms.change_rate)
        limit = float(np.nanpercentile(np.abs(change), 99)) or 1.0
        image = bottom.imshow(change, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                              extent=(-0.5, change.shape[1] - 0.5, change.shape[0] + 0.5, 0.5))
        figure.colorbar(image, ax=bottom, label="relative change from the layer below")
        bottom.set_ylabel("layer")
        _tick_labels(bottom, tokens)
        figure.tight_layout()
    return figure


def high_entropy_logits_figure(high: HighEntropyPositions, tokens: Sequence[str]) -> Figure:
    """Top-k logits at the highest-entropy positions, candidates written in the cells (the title
    says "centred logits" when `high.logit_kind` is "centered_logit")."""
    with _plain_text():
        logits = _np(high.top_logits)
        figure, axis = _subplots(figsize=(min(12, 2 + 1.3 * logits.shape[1]), 0.4 * len(high.positions) + 1.2))
        axis.imshow(logits, aspect="auto", cmap="magma")
        for row in range(logits.shape[0]):
            for column in range(logits.shape[1]):
                axis.text(column, row, f"{display_token(high.top_tokens[row][column])}\n{logits[row, column]:.1f}",
                          ha="center", va="center", color="white", fontsize=6)
        axis.set_yticks(range(len(high.positions)),
                        [f"{p}: {display_token(tokens[p])} (H={h:.2f})" for p, h in zip(high.positions, _np(high.entropy).tolist())])
        axis.set_xticks(range(logits.shape[1]), [f"#{i + 1}" for i in range(logits.shape[1])])
        kind = "centred logits" if high.logit_kind == "centered_logit" else "logits"
        axis.set_title(f"{kind} of the top candidates at the highest-entropy positions")
        figure.tight_layout()
    return figure


def logit_lens_figure(lens: LogitLens, tokens: Sequence[str]) -> Figure:
    """The lens table (each layer's top-1 token, coloured by its probability) and the confidence
    (mean top-1 probability) by layer."""
    with _plain_text():
        n_layers, n_positions = lens.max_probs.shape
        figure, (table, curve) = _subplots(1, 2, figsize=(min(16, 3 + 0.9 * n_positions) + 3, 0.28 * n_layers + 2),
                                              gridspec_kw={"width_ratios": [4, 1]})
        table.imshow(_np(lens.max_probs), aspect="auto", cmap="Blues", vmin=0, vmax=1)
        for layer in range(n_layers):
            for column in range(n_positions):
                table.text(column, layer, display_token(lens.top_tokens[layer][column][0]), ha="center", va="center", fontsize=5)
        table.set_yticks(range(n_layers), lens.layer_labels)
        table.set_xticks(range(n_positions), [display_token(tokens[p]) for p in lens.positions], rotation=90)
        table.set_title("logit lens: top-1 token per layer (colour: its probability)")
        curve.plot(_np(lens.confidence), range(n_layers), marker=".")
        curve.invert_yaxis()
        curve.set_xlim(0, 1)
        curve.set_yticks(range(n_layers), lens.layer_labels)
        curve.set_xlabel("confidence (mean top-1 probability)")
        figure.tight_layout()
    return figure


def head_entropy_figure(entropy: HeadEntropy) -> Figure:
    """Per layer × head: mean normalised attention entropy, and mean attention mass on sinks."""
    with _plain_text():
        figure, (left, right) = _subplots(1, 2, figsize=(10, 0.2 * len(entropy.layers) + 2))
        for axis, values, label, cmap in ((left, entropy.mean_normalised, "entropy / log(visible keys)", "viridis"),
                                          (right, entropy.mean_sink_mass, "attention mass on sinks", "Reds")):
            image = axis.imshow(_np(values), aspect="auto", cmap=cmap, vmin=0, vmax=1)
            axis.set_yticks(range(len(entropy.layers)), [str(layer) for layer in entropy.layers])
            axis.set_xlabel("head")
            axis.set_ylabel("layer")
            figure.colorbar(image, ax=axis, label=label)
        figure.tight_layout()
    return figure


def rollout_figure(rollout: "Rollout | RolloutRows", tokens: Sequence[str]) -> Figure:
    """The rollout matrix (or the rows of `RolloutRows`, one per chosen query): how much each
    query traces back to each input token."""
    with _plain_text():
        rows = getattr(rollout, "rows", None)
        figure, axis = _subplots(figsize=(8, 7 if rows is None else min(7.0, 1.5 + 0.12 * len(rows))))
        keys = tokens[rollout.key_span.start : rollout.key_span.stop] if rollout.key_span else tokens
        image = axis.imshow(_np(rollout.matrix if rows is None else rows), cmap="viridis", aspect="auto")
        figure.colorbar(image, ax=axis, label="rollout")
        _tick_labels(axis, list(keys))
        _tick_labels(axis, list(tokens) if rows is None else [tokens[q] for q in rollout.queries], which="y")
        axis.set_title(f"attention rollout ({rollout.head_fusion} over heads, residual weight {rollout.residual_weight})")
        figure.tight_layout()
    return figure


def layer_heads_grid_figure(patterns: torch.Tensor, tokens: Sequence[str], layer: int) -> Figure:
    """Every head's attention pattern at one layer in a grid, plus the mean over heads."""
    with _plain_text():
        n_heads = patterns.shape[0]
        columns = min(5, n_heads + 1)
        rows = -(-(n_heads + 1) // columns)
        figure, axes = _subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), squeeze=False)
        panels = [(f"L{layer}H{head}", patterns[head]) for head in range(n_heads)] + [(f"L{layer} mean", patterns.mean(0))]
        for axis in axes.flat:
            axis.axis("off")
        for axis, (title, pattern) in zip(axes.flat, panels):
            axis.imshow(_np(pattern.float()), cmap="viridis", vmin=0, vmax=1)
            axis.set_title(title)
        figure.tight_layout()
    return figure


def dla_figure(attribution: LogitAttribution, n_layers: int, n_heads: int, *, top: int = 20) -> Figure:
    """Direct logit attribution: the largest components, and every head as a layer × head map."""
    with _plain_text():
        figure, (bars, grid) = _subplots(1, 2, figsize=(12, max(4, 0.22 * top + 1)))
        largest = attribution.top(top)
        bars.barh([label for label, _ in largest][::-1], [value for _, value in largest][::-1],
                  color=["#c44e52" if value < 0 else "#4c72b0" for _, value in largest][::-1])
        bars.set_xlabel("contribution to the logit (difference)")
        heads = np.zeros((n_layers, n_heads))
        for label, value in zip(attribution.labels, _np(attribution.contributions).tolist()):
            if label.startswith("L") and "H" in label:
                layer, head = label[1:].split("H")
                heads[int(layer), int(head)] = value
        limit = float(np.abs(heads).max()) or 1.0
        image = grid.imshow(heads, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        figure.colorbar(image, ax=grid, label="head contribution")
        grid.set_xlabel("head")
        grid.set_ylabel("layer")
        figure.tight_layout()
    return figure


def layer_similarity_figure(similarity: LayerSimilarity) -> Figure:
    """Cosine similarity of the residual stream between every pair of layers."""
    with _plain_text():
        figure, axis = _subplots(figsize=(6, 5))
        image = axis.imshow(_np(similarity.cosine), cmap="viridis", vmin=-1, vmax=1)
        figure.colorbar(image, ax=axis, label="mean cosine similarity")
        step = max(1, len(similarity.layer_labels) // 16)
        ticks = list(range(0, len(similarity.layer_labels), step))
        axis.set_xticks(ticks, [similarity.layer_labels[i] for i in ticks], rotation=90)
        axis.set_yticks(ticks, [similarity.layer_labels[i] for i in ticks])
        figure.tight_layout()
    return figure


def repetition_figure(signals: dict[str, torch.Tensor], labels: torch.Tensor, tokens: Sequence[str]) -> Figure:
    """Repetition signals over the generated tokens, with the text-level loop regions shaded."""
    with _plain_text():
        figure, axis = _subplots(figsize=(10, 3.5))
        for name, values in signals.items():
            axis.plot(_np(values), label=name, linewidth=1.2)
        for position, label in enumerate(labels.tolist()):
            if label:
                axis.axvspan(position - 0.5, position + 0.5, color="#f4a582", alpha=0.35, linewidth=0)
        axis.set_xlabel("generated token (shaded: completes a repeated 4-gram)")
        _tick_labels(axis, list(tokens))
        axis.legend(loc="upper left", fontsize=7)
        figure.tight_layout()
    return figure


def projection_figure(projection: Projection) -> Figure:
    """Scatter of the first two principal components, points labelled."""
    with _plain_text():
        figure, axis = _subplots(figsize=(7, 6))
        points = _np(projection.coordinates)
        axis.scatter(points[:, 0], points[:, 1], s=12, c=range(len(points)), cmap="viridis")
        for (x, y), label in zip(points[:, :2], projection.labels):
            axis.annotate(display_token(label), (x, y), fontsize=6)
        ratio = _np(projection.explained_variance_ratio).tolist()
        axis.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        if len(ratio) > 1:
            axis.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
        figure.tight_layout()
    return figure


def ablation_figure(effect: torch.Tensor, metric_label: str) -> Figure:
    """Layer × head heatmap of an ablation sweep's effect on a metric (diverging around 0)."""
    with _plain_text():
        figure, axis = _subplots(figsize=(max(5, 0.45 * effect.shape[1] + 2), 0.22 * effect.shape[0] + 1.5))
        limit = float(effect.abs().max()) or 1.0
        image = axis.imshow(_np(effect), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        figure.colorbar(image, ax=axis, label=f"change in {metric_label} when the head is ablated")
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        figure.tight_layout()
    return figure


def comparison_figure(maps: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], images: Sequence, titles: Sequence[str]) -> Figure:
    """Attention maps (one per condition, over its rows × cols grid) overlaid on their images."""
    with _plain_text():
        figure, axes = _subplots(1, len(maps), figsize=(4.5 * len(maps), 4.2), squeeze=False)
        for axis, attention, (rows, cols), image, title in zip(axes[0], maps, grids, images, titles):
            picture = np.asarray(image)
            axis.imshow(picture)
            axis.imshow(_np(attention.reshape(rows, cols)), cmap="inferno", alpha=0.55,
                        extent=(0, picture.shape[1], picture.shape[0], 0), interpolation="nearest")
            axis.set_title(title)
            axis.axis("off")
        figure.tight_layout()
    return figure


def image_mass_figure(mass_per_layer: torch.Tensor) -> Figure:
    """Mean attention mass on the image tokens at each layer (the FastV view)."""
    with _plain_text():
        figure, axis = _subplots(figsize=(6, 3))
        axis.plot(_np(mass_per_layer), marker="o")
        axis.set_xlabel("layer")
        axis.set_ylabel("attention mass on the image")
        axis.set_ylim(0, 1)
        figure.tight_layout()
    return figure


def cross_modal_figure(result) -> Figure:
    """Alignment (mean cosine) and modality gap (Liang et al. 2022) between image-token and
    text-token hidden states across layers (a `CrossModal`)."""
    with _plain_text():
        figure, axis = _subplots(figsize=(6, 3))
        axis.plot(result.layers, result.alignment.numpy(), marker="o", label="alignment (mean cosine)")
        axis.plot(result.layers, result.modality_gap.numpy(), marker="s", label="modality gap ‖x̄̂ − ȳ̂‖")
        axis.set_xlabel("layer")
        axis.set_ylim(-1, 2)
        axis.axhline(0, color="#999", linewidth=0.5)
        axis.legend(fontsize=8)
        figure.tight_layout()
    return figure


def _lanes(lanes: Sequence[tuple[str, torch.Tensor, float | None, float | None]], tokens: Sequence[str], layers: Sequence[int]) -> Figure:
    """One heatmap lane (layer × generated token) per metric, sharing the token axis."""
    with _plain_text():
        figure, axes = _subplots(len(lanes), 1, figsize=(max(6.0, 0.28 * len(tokens) + 2), 1.1 + 1.3 * len(lanes)), sharex=True, squeeze=False)
        for axis, (title, values, low, high) in zip(axes[:, 0], lanes):
            image = axis.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
            axis.set_ylabel("layer", fontsize=8)
            axis.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
            axis.set_title(title, fontsize=9, loc="left")
            figure.colorbar(image, ax=axis, fraction=0.025, pad=0.01)
        _tick_labels(axes[-1, 0], tokens)
        axes[-1, 0].set_xlabel("generated token")
        figure.tight_layout()
    return figure


def dynamics_figure(dynamics, *, regions: Sequence[str] | None = None) -> Figure:
    """Lanes over the generated tokens (an `ImageDynamics`): image mass, normalised entropy and
    each region's enrichment (mass / area; 1 = as much as its area), head-mean per layer."""
    names = list(regions) if regions is not None else list(dynamics.region_mass)
    lanes = [("attention mass on the image", dynamics.image_mass.mean(1), 0.0, 1.0),
             ("normalised entropy over the image", dynamics.normalised_entropy.mean(1), 0.0, 1.0)]
    lanes += [(f"{name}: mass / area", dynamics.region_enrichment(name).mean(1), 0.0, None) for name in names]
    return _lanes(lanes, dynamics.tokens, dynamics.layers)


def keyword_dynamics_figure(dynamics) -> Figure:
    """Lanes over the generated tokens (a `KeywordDynamics`): attention mass on each keyword,
    head-mean per layer."""
    return _lanes([(f"attention to “{keyword}”", dynamics.per_layer(keyword), 0.0, None) for keyword in dynamics.keywords],
                  dynamics.tokens, dynamics.layers)


def instruction_check_figure(check) -> Figure:
    """Attention of each prompt's answer to its instruction keywords per layer (an
    `InstructionCheck`), flagged prompts marked ✗."""
    with _plain_text():
        figure, axis = _subplots(figsize=(max(5.0, 0.5 * len(check.layers) + 3), 1.2 + 0.35 * len(check.prompts)))
        image = axis.imshow(check.mass.numpy(), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        flagged = set(check.below)
        labels = [("✗ " if i in flagged else "") + display_token(prompt) for i, prompt in enumerate(check.prompts)]
        axis.set_yticks(range(len(labels)), labels)
        axis.set_xticks(range(len(check.layers)), [str(layer) for layer in check.layers])
        axis.set_xlabel("layer")
        axis.set_title(f"attention of the answer to the keywords (threshold {check.threshold:g} on the layer mean)", fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.03)
        figure.tight_layout()
    return figure
