"""Assemble one self-contained, offline HTML file: circuitsvis' bundle inlined exactly once, every
view rendered from it, figures inline as PNG, every token string HTML-escaped.

Views render lazily: each view's `<script>` only registers it (LAZY_VIEWS, in the bundle's
element, swaps `CircuitsVis.render` for a scheduler); a view renders when it comes within
VIEW_MARGIN of the viewport, one view per task, so the page is readable at once and stays
responsive. `mechvisReport.renderAll()` (also run before printing, and on load with `#render-all`
in the address) renders every view."""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from mechvis.interventions import AblationSweep
from mechvis.report.build import ReportData, report_json
from mechvis.viz import figures
from mechvis.viz.views import (
    COLOUR_MODES,
    View,
    attention_layer_view,
    circuitsvis_bundle,
    colored_tokens_view,
    json_safe,
    topk_tokens_view,
    topk_tokens_view_from_signals,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; }
.tokens span { border-radius: 3px; }
.prompt { color: #666; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: .9rem; } td, th { padding: .2rem .6rem; border-bottom: 1px solid #eee; text-align: left; }
.note { color: #555; font-size: .9rem; }
.circuitsvis-view:empty { min-height: 12rem; background: #fafafa; }
"""

VIEW_MARGIN = "800px"

# Runs right after circuitsvis' bundle, in the same <script> element (the bundle defines the global
# `CircuitsVis`; its `render` is copied aside and replaced by the lazy scheduler below).
LAZY_VIEWS = """
(function () {
  "use strict";
  var draw = CircuitsVis.render, views = new Map(), waiting = new Map(), queue = [], busy = false;
  var everything = /(^|[#&?])render-all\\b/.test(location.hash + location.search);
  var observer = ("IntersectionObserver" in window && !everything) ? new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) { if (entry.isIntersecting) enqueue(entry.target.id); });
  }, {rootMargin: "MARGIN 0px"}) : null;
  function renderNow(id) {
    if (!waiting.has(id)) return;
    waiting.delete(id);
    var element = document.getElementById(id), view = views.get(id);
    if (observer) observer.unobserve(element);
    draw(id, view.component, view.props);
    element.dataset.rendered = "true";
  }
  function pump() {
    busy = false;
    if (queue.length) renderNow(queue.shift());
    if (queue.length) schedule();
  }
  function schedule() { if (!busy) { busy = true; setTimeout(pump, 0); } }
  function enqueue(id) { if (waiting.has(id) && queue.indexOf(id) < 0) { queue.push(id); schedule(); } }
  function register(id, component, props) {
    views.set(id, {component: component, props: props});
    waiting.set(id, true);
    if (observer) observer.observe(document.getElementById(id)); else enqueue(id);
  }
  function showHead(id, head) {  // the layer views' head selector: -1 = mean of heads
    var view = views.get(id);
    if (!view.mean) { view.mean = view.props.attention; view.meanName = view.props.attentionHeadNames; }
    var props = Object.assign({}, view.props);
    if (head >= 0) { props.attention = [props.heads[head]]; props.attentionHeadNames = [props.headNames[head]]; }
    else { props.attention = view.mean; props.attentionHeadNames = view.meanName; }
    view.props = props;
    var old = document.getElementById(id);
    if (!waiting.has(id)) {  // drawn already: a fresh container for a fresh React root
      var fresh = document.createElement("div");
      fresh.className = old.className; fresh.id = id;
      old.replaceWith(fresh);
      waiting.set(id, true);
    }
    renderNow(id);
  }
  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.matches && target.matches("select.mechvis-head")) showHead(target.dataset.view, Number(target.value));
  });
  CircuitsVis = Object.assign({}, CircuitsVis, {render: register});
  window.mechvisReport = {
    renderAll: function () { Array.from(waiting.keys()).forEach(renderNow); },
    waiting: function () { return waiting.size; },
    showHead: showHead
  };
  window.addEventListener("beforeprint", window.mechvisReport.renderAll);
})();
""".replace("MARGIN", VIEW_MARGIN)


def figure_html(figure: Figure, caption: str) -> str:
    """A figure as an inline PNG with an escaped caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    png = buffer.getvalue()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR: the layout is known before decoding
    encoded = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(caption)}" width="{width}" height="{height}" src="data:image/png;base64,{encoded}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _entropy_colour(value: float, maximum: float) -> str:
    strength = 0.0 if maximum <= 0 else min(1.0, max(0.0, value / maximum))
    return f"rgba(214, 96, 77, {0.08 + 0.8 * strength:.2f})"


def _summary(data: ReportData) -> str:
    trace, run = data.trace, data.trace.run
    entropy = data.signals.entropy
    generated = list(trace.generated_positions)
    maximum = max((entropy[p - 1].item() for p in generated), default=1.0)
    spans = []
    for position in generated:
        value = entropy[position - 1].item()
        spans.append(f'<span title="position {position}, entropy {value:.2f} nats" '
                     f'style="background:{_entropy_colour(value, maximum)}">{html.escape(run.str_tokens[position])}</span>')
    prompt_text = html.escape("".join(run.str_tokens[: trace.prompt_length]))
    lines = [
        f"<p><b>Model</b> {html.escape(data.model_summary.name)} ({html.escape(data.model_summary.architecture)}, "
        f"{data.model_summary.n_layers} layers, {data.model_summary.n_params:,} parameters)</p>",
        f"<p><b>Prompt</b> ({'chat template' if data.chat else 'completion'}):</p>",
        f'<div class="tokens prompt">{prompt_text}</div>',
        "<p><b>Generated</b> (background: entropy of the distribution each token was drawn from; hover for values):</p>",
        f'<div class="tokens">{"".join(spans) or "<i>nothing was generated</i>"}</div>',
    ]
    lines += [f'<p class="note"><b>Note</b>: {html.escape(note)}</p>' for note in data.notes]
    if data.repetition is not None:
        rep = data.repetition
        onset = "no loop detected" if rep.loop_onset is None else f"loop visible in the text from generated token {rep.loop_onset} (position {trace.prompt_length + rep.loop_onset})"
        alarm = "no alarm" if rep.alarm is None else f"monitor alarm at generated token {rep.alarm}"
        lines.append(f"<p><b>Repetition</b>: {onset}; {alarm}; seq-rep-4 = {rep.seq_rep_4:.3f}.</p>")
    return "\n".join(lines)


def ablation_section(sweep: AblationSweep, target_label: str, *, n_top: int = 10) -> str:
    """Heatmap and table of the heads whose ablation moves P(target) most (HTML, escaped)."""
    rows = "".join(
        f"<tr><td>L{layer}H{head}</td><td>{effect:+.4f}</td></tr>" for layer, head, effect in sweep.top(n_top)
    )
    return (
        f"<p>{html.escape(sweep.method)} ablation of each head on its own; baseline P({html.escape(target_label)}) = "
        f"{sweep.baseline:.4f}.</p>"
        + figure_html(figures.ablation_figure(sweep.effect, f"P({target_label})"), "effect of ablating each head")
        + f"<table><tr><th>head</th><th>change in P({html.escape(target_label)})</th></tr>{rows}</table>"
    )


def _vision_study_parts(vision) -> list[str]:
    """Geometry, dynamics, information and cross-modal parts of the image section (escaped)."""
    parts = []
    if vision.geometry is not None:
        g = vision.geometry
        parts.append(
            f"<p>Geometry of the mean map: 50 % of the mass in {g.contour_50.cells} cells ({g.contour_50.fraction:.1%} of the image), "
            f"90 % in {g.contour_90.cells} ({g.contour_90.fraction:.1%}); convex hull of the 90 % cells {g.hull_90.cells:.1f} cells² "
            f"({g.hull_90.fraction:.1%}).</p>")
    if vision.dynamics is not None:
        dynamics = vision.dynamics
        parts.append(figure_html(figures.dynamics_figure(dynamics), "attention dynamics over the generated tokens (head mean, per layer)"))
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{dynamics.region_area[name]:.3f}</td><td>"
            + ", ".join(f"{html.escape(repr(token))} ({mass:.3f})" for _, token, mass in dynamics.peaks(name, top=3))
            + "</td></tr>"
            for name in dynamics.region_mass)
        parts.append(f"<table><tr><th>region</th><th>area share</th><th>tokens where its mass peaks</th></tr>{rows}</table>")
    if vision.information is not None:
        info = vision.information
        parts.append(f"<p>I(quadrant; generated token) = {info.mutual_information:.4f} nats of H(quadrant) = "
                     f"{info.region_entropy:.4f} nats ({info.normalised:.1%}).</p>")
    if vision.cross_modal is not None:
        parts.append(figure_html(figures.cross_modal_figure(vision.cross_modal), "image vs text hidden states across layers"))
    return parts


def _section(title: str, anchor: str, parts: list[str], note: str = "") -> str:
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{note_html}\n' + "\n".join(parts) + "</section>"


def _view_html(view: View, index: int) -> str:
    element_id = f"cv-{index}"
    selector = ""
    if "heads" in view.props:  # attention_layer_view: choose the head it draws
        options = "".join(f'<option value="{head}">{html.escape(name)}</option>' for head, name in enumerate(view.props["headNames"]))
        selector = (f' <label class="note">show <select class="mechvis-head" data-view="{element_id}">'
                    f'<option value="-1">mean of heads</option>{options}</select></label>')
    return f"<h3>{html.escape(view.title)}{selector}</h3>\n{view.render_call(element_id)}"


def render_report(data: ReportData, model) -> str:
    """The whole report as one HTML string. Token text outside matplotlib's font (emoji, CJK) is
    drawn as boxes in the figures, without one warning per glyph (the HTML views show it)."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        return _render_report(data, model)


def _render_report(data: ReportData, model) -> str:
    with tqdm(total=8, desc="rendering", unit="section") as progress:  # closed on errors too
        return _render_sections(progress, data, model)


def _render_sections(progress, data: ReportData, model) -> str:
    trace, run = data.trace, data.trace.run
    tokens = run.str_tokens
    sections = [f"<header><h1>mechvis report</h1>{_summary(data)}</header>"]
    views: list[View] = []

    def add_views(new: list[View]) -> list[str]:
        start = len(views)
        views.extend(new)
        return [_view_html(view, start + i) for i, view in enumerate(new)]

    sections.append(_section("Token signals", "tokens", [
        figure_html(figures.token_entropy_curve(data.signals, tokens), "entropy of the next-token distribution at each position"),
        figure_html(figures.token_entropy_curve(data.signals, tokens, sort=True), "the same, sorted"),
        figure_html(figures.high_entropy_logits_figure(data.high_entropy, tokens), "top-k logits at the highest-entropy positions"),
        *add_views([colored_tokens_view(trace, data.signals, mode) for mode in COLOUR_MODES]),
        *add_views([topk_tokens_view(model, run) if run.logits.shape[-1] else topk_tokens_view_from_signals(model, run, data.signals, data.next_ranks)]),
    ], "Colour modes: entropy (nats) and probability of the distribution each token came from, top-1 minus top-2 probability, and sampled tokens that were not the argmax."))
    progress.update()
    sections.append(_section("Logit lens", "lens", [
        figure_html(figures.logit_lens_figure(data.lens, tokens), "each layer's top-1 token at the last positions; confidence by layer"),
    ], "The final norm is recomputed for each layer's residual stream."))
    progress.update()
    attention_parts = [figure_html(figures.head_entropy_figure(data.entropy), "head entropy and sink mass")]
    # Whole patterns only where the cache holds them: the long-context path keeps none (N × N each).
    pattern_layers = [layer for layer in data.attention_layers if f"blocks.{layer}.attn.hook_pattern" in run.cache]
    for layer in pattern_layers:
        pattern = run.cache[f"blocks.{layer}.attn.hook_pattern"][0]
        attention_parts.append(figure_html(figures.layer_heads_grid_figure(pattern, tokens, layer), f"all heads of layer {layer} and their mean"))
    attention_parts += add_views([attention_layer_view(run, layer) for layer in pattern_layers])
    sections.append(_section("Attention", "attention", attention_parts, "Entropy of each head's rows divided by log(visible keys); sinks are reported separately."))
    progress.update()
    queries = data.rollout.queries
    sections.append(_section("Attention rollout", "rollout", [
        figure_html(figures.rollout_figure(data.rollout, tokens), f"attention rollout of {len(queries)} query positions "
                    f"({queries[0]}{'' if len(queries) == 1 else f' … {queries[-1]}'})"),
    ], "Rows for the last prompt token and the generated tokens (at most 64 of these, evenly spaced); the full matrix is in the "
       "JSON with --full-rollout."))
    progress.update()
    residual_parts = [figure_html(figures.layer_similarity_figure(data.similarity), "residual-stream similarity between layers")]
    if data.attribution is not None:
        attribution = data.attribution
        answer = html.escape(repr(model.hf_tokenizer.decode([attribution.answer_id])))
        other = html.escape(repr(model.hf_tokenizer.decode([attribution.counterfactual_id])))
        residual_parts.insert(0, f"<p>Direct logit attribution of the last generated token {answer} against the runner-up {other} "
                                 f"(logit difference {attribution.model_value:.3f}).</p>")
        residual_parts.insert(1, figure_html(figures.dla_figure(attribution, model.cfg.n_layers, model.cfg.n_heads), "direct logit attribution"))
    sections.append(_section("Residual stream", "residual", residual_parts))
    progress.update()
    sections.append(_section("Activations", "activations", [
        figure_html(figures.activation_norms_figure(data.norms, tokens), "residual-stream L2 norm per layer and token, and its change rate"),
        figure_html(figures.projection_figure(data.projection), "PCA of the hidden states at the middle layer"),
    ]))
    progress.update()
    if data.repetition is not None:
        rep = data.repetition
        generated_tokens = tokens[trace.prompt_length :]
        signals = {"monitor P(loop)": rep.monitor_probability, "recurrence": rep.features["recurrence"],
                   "copy attention": rep.features["copy_attention"], "confidence": rep.features["confidence"]}
        sections.append(_section("Repetition", "repetition", [
            figure_html(figures.repetition_figure(signals, rep.labels, generated_tokens), "repetition signals over the generated tokens"),
        ], "Signals of each generated token come from the state that produced it (causal)."))
    if data.vision is not None:
        vision = data.vision
        grid = (vision.attention.grid.rows, vision.attention.grid.cols)
        maps, shapes, titles = [vision.mean_map], [grid], ["mean attention of the generated tokens"]
        if vision.rollout is not None:
            maps.append(vision.rollout.maps.mean(0))
            shapes.append(vision.rollout.patch_shape)
            titles.append("rollout through the vision encoder (per patch)")
        spots = "".join(f"<tr><td>{len(spot.cells)}</td><td>{spot.mass:.3f}</td><td>({spot.centre[0]:.1f}, {spot.centre[1]:.1f})</td></tr>"
                        for spot in vision.hotspots)
        sections.append(_section("Image attention", "vision", [
            figure_html(figures.image_mass_figure(vision.attention.mass_per_layer), "attention mass on the image per layer"),
            figure_html(figures.comparison_figure(maps, shapes, [vision.image] * len(maps), titles), "where the generated tokens look"),
            f"<table><tr><th>hotspot cells</th><th>mass</th><th>centre (row, col)</th></tr>{spots}</table>",
            f"<p>All layers × heads clustered by Jensen–Shannon distance of their image maps (average linkage, "
            f"k = {vision.clusters.n_clusters} by silhouette {vision.clusters.silhouette:.3f}); labels layer by layer: "
            f"{html.escape(str(vision.clusters.labels))}.</p>",
        ] + _vision_study_parts(vision), f"Grid of {grid[0]} × {grid[1]} image tokens; hotspots are cells above 3× the uniform share."))
    if data.ablation is not None:
        sections.append(_section("Head ablation", "ablation", [ablation_section(data.ablation, data.ablation_target)]))
    progress.update()
    document = "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>mechvis report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<script>{circuitsvis_bundle()}\n{LAZY_VIEWS}</script>",
        *sections,
        "</body></html>",
    ])
    progress.update()
    progress.close()
    return document


def write_json(data: ReportData, path: Path) -> None:
    path.write_text(json.dumps(json_safe(report_json(data)), indent=1, ensure_ascii=False), encoding="utf-8")

