// The 16 tabs. Each reads the server's results of mechvis.analysis functions and draws them;
// none computes a metric. Token strings reach plotly escaped (its text is HTML-like).
import { attentionLayer, getJSON, postJSON, streamGenerate, streamPost, token } from "./api.js";
import { combineHeads, drawHeatmap, scatter3d } from "./canvas.js";
import { greenRed } from "./colour.js";
import { select, selection } from "./state.js";
import { recolour, view, visible } from "./transcript.js";

export const esc = (text) => String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const el = (tag, text, className) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (className) e.className = className; return e; };
const PLOT = { displaylogo: false, responsive: true, displayModeBar: false };
const margin = { l: 50, r: 10, t: 30, b: 40 };
const cache = new Map();
const memo = (key, load) => { if (!cache.has(key)) cache.set(key, load().catch((e) => { cache.delete(key); throw e; })); return cache.get(key); };
const tokLabel = (run, p) => `${p}:${visible(run.tokens[p].text)}`;
const afterAttach = [];  // callbacks a tab queues for when its content is in the document

let circuitsvis = null;
/** circuitsvis' bundle (served from its installed wheel at /vendor/circuitsvis.js), loaded once, on demand. */
function loadCircuitsvis() {
  if (!circuitsvis) {
    circuitsvis = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = "/vendor/circuitsvis.js";
      script.onload = () => resolve(window.CircuitsVis);
      script.onerror = () => { circuitsvis = null; reject(new Error("circuitsvis' bundle did not load")); };
      document.head.append(script);
    });
  }
  return circuitsvis;
}

/** A circuitsvis view the server built with mechvis.viz.views (component, title, props), drawn into `body`. */
async function circuitsvisView(body, path, params, id) {
  const [view, library] = await Promise.all([getJSON(path, params), loadCircuitsvis()]);
  body.append(el("div", `${view.title} (circuitsvis ${view.component})`, "muted"));
  const host = el("div", undefined, "circuitsvis-view"); host.id = id;
  body.append(host);
  // circuitsvis renders by element id: only once this tab's content is in the document (a stale render's host never is)
  afterAttach.push(() => { if (document.getElementById(id) === host) library.render(id, library[view.component], view.props); });
}

function circuitsvisToggle(key, label) {
  const on = localStorage.getItem(key) === "1";
  return [on, checkbox(label, on, (v) => { localStorage.setItem(key, v ? "1" : "0"); select({}); })];
}

function plot(body, traces, layout) {
  const div = el("div", undefined, "plot");
  body.append(div);
  window.Plotly.newPlot(div, traces, { margin, font: { size: 11 }, ...layout }, PLOT);
  return div;
}

function controls(body, ...items) { const bar = el("div", undefined, "tab-controls"); bar.append(...items); body.append(bar); return bar; }

function selectBox(label, options, value, onChange) {
  const wrap = el("label", label + " ");
  const box = el("select");
  for (const [v, text] of options) { const o = el("option", text); o.value = String(v); box.append(o); }
  box.value = String(value);
  box.onchange = () => onChange(box.value);
  wrap.append(box);
  return wrap;
}

function checkbox(label, checked, onChange) {
  const wrap = el("label"); const box = el("input"); box.type = "checkbox"; box.checked = checked;
  box.onchange = () => onChange(box.checked); wrap.append(box, ` ${label}`); return wrap;
}

function layerSelect(run) {
  return selectBox("layer", Array.from({ length: run.n_layers }, (_, i) => [i, String(i)]), selection.layer, (v) => select({ layer: Number(v) }));
}

function sortableTable(columns, rows, onRowClick) {
  const table = el("table", undefined, "sortable");
  const head = el("tr");
  let order = { column: null, descending: false };
  const body = el("tbody");
  function fill() {
    const sorted = rows.slice();
    if (order.column !== null) sorted.sort((a, b) => ((a[order.column] ?? -Infinity) > (b[order.column] ?? -Infinity) ? 1 : -1) * (order.descending ? -1 : 1));
    body.replaceChildren(...sorted.map((r) => {
      const tr = el("tr", undefined, onRowClick ? "clickable" : "");
      columns.forEach((c, i) => {
        const td = el("td");
        if (c.render) td.append(c.render(r)); else td.textContent = typeof r[i] === "number" ? Number(r[i]).toFixed(c.digits ?? 3) : String(r[i] ?? "—");
        tr.append(td);
      });
      if (onRowClick) tr.onclick = (e) => { if (e.target.tagName !== "INPUT") onRowClick(r); };
      return tr;
    }));
  }
  columns.forEach((c, i) => {
    const th = el("th", c.name); th.dataset.column = String(i);
    if (!c.render) th.onclick = () => { order = { column: i, descending: order.column === i ? !order.descending : true }; fill(); };
    head.append(th);
  });
  const thead = el("thead"); thead.append(head);
  table.append(thead, body);
  fill();
  return table;
}

export const ticked = new Set();  // heads "L.H" ticked in tab 3 for the interventions tab

async function attention(body, run) {
  const layer = Math.min(selection.layer, run.n_layers - 1);
  const { shape, data } = await attentionLayer(run.id, layer);
  const [heads, n] = shape;
  const options = { log: localStorage.getItem("mv-log") === "1", hideSinks: localStorage.getItem("mv-hide") === "1" };
  controls(body, layerSelect(run),
    selectBox("head", [["mean", "mean"], ["max", "max"], ...Array.from({ length: heads }, (_, h) => [h, `head ${h}`])], selection.head,
      (v) => select({ head: ["mean", "max"].includes(v) ? v : Number(v) })),
    checkbox("hide sink column", options.hideSinks, (v) => { localStorage.setItem("mv-hide", v ? "1" : "0"); select({}); }),
    checkbox("log scale", options.log, (v) => { localStorage.setItem("mv-log", v ? "1" : "0"); select({}); }));
  const canvas = el("canvas", undefined, "heatmap");
  canvas.id = "attention-canvas";
  canvas.style.width = "100%";
  const started = performance.now();
  const matrix = combineHeads(data, heads, n, selection.head);
  drawHeatmap(canvas, matrix, n, { log: options.log, hide: options.hideSinks ? run.sinks : [], row: selection.pos });
  canvas.dataset.drawMs = (performance.now() - started).toFixed(2);
  canvas.onclick = (e) => { const q = Math.floor((e.offsetY / canvas.clientHeight) * n); if (q >= 0 && q < n) select({ pos: q, positions: [] }); };
  body.append(canvas);
  if (selection.pos !== null && selection.pos < n) {
    const row = Array.from(matrix.subarray(selection.pos * n, selection.pos * n + selection.pos + 1), (v) => v / 255);
    body.append(el("div", `query ${tokLabel(run, selection.pos)}: strongest keys`, "muted"));
    const best = row.map((v, k) => [v, k]).sort((a, b) => b[0] - a[0]).slice(0, 5);
    for (const [v, k] of best) body.append(el("div", `${v.toFixed(3)}  ${tokLabel(run, k)}`, "dist-row"));
  }
}

async function allHeads(body, run) {
  const layer = Math.min(selection.layer, run.n_layers - 1);
  const [{ shape, data }, stats] = await Promise.all([attentionLayer(run.id, layer), memo(`${run.id}/heads`, () => getJSON(`/api/runs/${run.id}/heads`))]);
  const [heads, n] = shape;
  let sortBy = localStorage.getItem("mv-heads-sort") || "head";
  const [interactive, toggle] = circuitsvisToggle("mv-heads-cv", "interactive (circuitsvis, ≤ 256 tokens)");
  controls(body, layerSelect(run), selectBox("sort by", [["head", "head"], ["entropy", "entropy"], ["sink", "sink mass"]], sortBy,
    (v) => { localStorage.setItem("mv-heads-sort", v); select({}); }), toggle);
  if (interactive) {
    if (n > 256) body.append(el("p", `circuitsvis needs seconds per view above 256 tokens; this run has ${n}. The grid below draws any length.`, "muted"));
    else { await circuitsvisView(body, `/api/runs/${run.id}/views/attention-heads`, { layer }, "cv-attention-heads"); return; }
  }
  const order = Array.from({ length: heads }, (_, h) => h);
  if (sortBy === "entropy") order.sort((a, b) => stats.entropy[layer][a] - stats.entropy[layer][b]);
  if (sortBy === "sink") order.sort((a, b) => stats.sink_mass[layer][b] - stats.sink_mass[layer][a]);
  const grid = el("div", undefined, "heads-grid");
  for (const h of order) {
    const figure = el("figure"); const canvas = el("canvas", undefined, "heatmap");
    canvas.style.width = "120px"; canvas.style.height = "120px";
    drawHeatmap(canvas, combineHeads(data, heads, n, h), n, { row: selection.pos });
    canvas.onclick = () => select({ head: h, tab: "attention" });
    figure.append(canvas, el("figcaption", `H${h} · H=${(stats.entropy[layer][h] ?? 0).toFixed(2)} · sink ${(stats.sink_mass[layer][h] ?? 0).toFixed(2)}`));
    grid.append(figure);
  }
  body.append(grid);
}

async function headEntropy(body, run) {
  const stats = await memo(`${run.id}/heads`, () => getJSON(`/api/runs/${run.id}/heads`));
  const kinds = new Map(stats.classes.map((c) => [`${c.layer}.${c.head}`, c.kind]));
  const rows = [];
  stats.entropy.forEach((row, layer) => row.forEach((value, head) => rows.push([layer, head, value, stats.entropy_nats[layer][head], stats.sink_mass[layer][head], kinds.get(`${layer}.${head}`)])));
  plot(body, [{ type: "heatmap", z: stats.entropy, colorscale: "Viridis", zmin: 0, zmax: 1, hovertemplate: "L%{y} H%{x}: %{z:.3f}<extra></extra>" }],
    { title: { text: "mean normalised attention entropy (layer × head)" }, height: 260, xaxis: { title: { text: "head" } }, yaxis: { title: { text: "layer" } } });
  const table = sortableTable([
    { name: "layer", digits: 0 }, { name: "head", digits: 0 }, { name: "entropy (norm.)" }, { name: "entropy (nats)" }, { name: "sink mass" }, { name: "class" },
    { name: "ablate", render: (r) => { const box = el("input"); box.type = "checkbox"; box.checked = ticked.has(`${r[0]}.${r[1]}`); box.onchange = () => { if (box.checked) ticked.add(`${r[0]}.${r[1]}`); else ticked.delete(`${r[0]}.${r[1]}`); }; return box; } },
  ], rows, (r) => select({ layer: r[0], head: r[1], tab: "attention" }));
  table.id = "head-table";
  body.append(table);
}

async function similarity(body, run) {
  const data = await memo(`${run.id}/similarity`, () => getJSON(`/api/runs/${run.id}/similarity`));
  plot(body, [{ type: "heatmap", z: data.cosine, x: data.labels, y: data.labels, colorscale: "RdBu", zmin: -1, zmax: 1, reversescale: true }],
    { title: { text: "cosine similarity of the residual stream after each layer" }, height: 420, yaxis: { autorange: "reversed" } });
}

function needsToken(body) {
  if (selection.pos === null || selection.pos < 1) { body.append(el("p", "Select a token (not the first) in the transcript.", "muted")); return true; }
  return false;
}

async function dla(body, run) {
  if (needsToken(body)) return;
  const per = localStorage.getItem("mv-dla") || "layer";
  controls(body, selectBox("components", [["layer", "per layer"], ["head", "per head"]], per, (v) => { localStorage.setItem("mv-dla", v); select({}); }));
  const data = await memo(`${run.id}/dla/${selection.pos}/${per}`, () => getJSON(`/api/runs/${run.id}/dla`, { position: selection.pos, per }));
  const order = data.labels.map((l, i) => i).sort((a, b) => Math.abs(data.contributions[b]) - Math.abs(data.contributions[a])).slice(0, 30);
  plot(body, [{ type: "bar", x: order.map((i) => data.labels[i]), y: order.map((i) => data.contributions[i]), marker: { color: order.map((i) => (data.contributions[i] > 0 ? "#d66" : "#69c")) } }],
    { title: { text: `direct logit attribution of ${esc(visible(run.tokens[selection.pos].text))} (logit ${data.model_value.toFixed(2)})` }, height: 320 });
}

async function lens(body, run) {
  const { lensFor } = await import("./inspector.js");
  const data = await lensFor(run.id);
  const n = run.tokens.length;
  const z = data.top_probs.map((layer) => layer.map((top) => top[0]));
  const text = data.top_tokens.map((layer) => layer.map((top) => esc(visible(top[0]))));
  const x = Array.from({ length: n }, (_, p) => p);
  const div = plot(body, [{ type: "heatmap", z, x, y: data.labels, text, colorscale: "Viridis", zmin: 0, zmax: 1,
    hovertemplate: "layer %{y} · position %{x}<br>top-1 %{text} (%{z:.3f})<extra></extra>" }],
  { title: { text: "logit lens: top-1 probability per layer × position" }, height: 360 });
  div.on("plotly_click", (e) => select({ pos: Math.min(n - 1, e.points[0].x + 1), positions: [] }));
  if (selection.pos !== null && selection.pos > 0) {
    const q = selection.pos - 1;
    plot(body, [{ type: "scatter", mode: "lines+markers", x: data.labels, y: data.kl.map((layer) => layer[q]), name: "KL" }],
      { title: { text: `KL(final ‖ layer) at position ${q} (nats)` }, height: 220 });
    const rows = data.labels.map((label, layer) => [label, ...data.top_tokens[layer][q].map((t, k) => `${visible(t)} ${data.top_probs[layer][q][k].toFixed(2)}`)]);
    body.append(sortableTable([{ name: "layer" }, { name: "top-1" }, { name: "top-2" }, { name: "top-3" }], rows));
  }
}

async function distribution(body, run) {
  const step = selection.pos !== null ? selection.pos - run.prompt_length : -1;
  if (step < 0 || step >= run.events.length) { body.append(el("p", "Select a generated token.", "muted")); return; }
  const data = await memo(`${run.id}/dist/${step}`, () => getJSON(`/api/runs/${run.id}/distribution/${step}`));
  const top = (list) => list.slice(0, 20);
  const bars = (list, name, colour) => ({ type: "bar", name, x: top(list).map((d) => `${esc(visible(d.text))} (${d.id})`), y: top(list).map((d) => d.p), marker: { color: colour } });
  plot(body, [bars(data.raw, "before (T = 1)", "#9ab"), bars(data.sampled, `after (T = ${data.temperature.toFixed(2)}, truncation)`, "#d74")],
    { title: { text: `step ${step}: sampled ${esc(visible(run.tokens[selection.pos].text))}; ${data.support} tokens kept` }, barmode: "group", height: 360 });
}

async function projection(body, run) {
  const dims = Number(localStorage.getItem("mv-dims") || 2);
  const layer = Number(localStorage.getItem("mv-proj-layer") ?? -1);
  controls(body,
    selectBox("states", [[-1, "token embeddings"], ...Array.from({ length: run.n_layers }, (_, i) => [i, `after layer ${i}`])], layer, (v) => { localStorage.setItem("mv-proj-layer", v); select({}); }),
    selectBox("view", [[2, "2-D"], [3, "3-D"]], dims, (v) => { localStorage.setItem("mv-dims", v); select({}); }));
  const data = await memo(`${run.id}/proj/${layer}/${dims}`, () => getJSON(`/api/runs/${run.id}/projection`, { layer, dims }));
  const colours = run.tokens.map((t, p) => (p >= run.prompt_length ? "#d74" : "#58a"));
  if (dims === 2) {
    const div = plot(body, [{ type: "scatter", mode: "markers", x: data.coordinates.map((c) => c[0]), y: data.coordinates.map((c) => c[1]),
      text: data.labels.map((l, p) => `${p}: ${esc(visible(l))}`), hovertemplate: "%{text}<extra></extra>",
      marker: { color: colours, size: run.tokens.map((t, p) => (p === selection.pos ? 12 : 6)) } }],
    { title: { text: "PCA of hidden states (2-D)" }, height: 420 });
    div.id = "projection-plot";
    div.on("plotly_click", (e) => select({ pos: e.points[0].pointIndex, positions: [] }));
  } else {
    const canvas = el("canvas"); canvas.width = 420; canvas.height = 420; canvas.id = "projection-3d";
    body.append(canvas, el("div", "drag to rotate; click a point to select its token", "muted"));
    scatter3d(canvas, data.coordinates, data.labels, colours, selection.pos, (i) => select({ pos: i, positions: [] }));
  }
}

async function activations(body, run) {
  const data = await memo(`${run.id}/act`, () => getJSON(`/api/runs/${run.id}/activations`));
  for (const kind of ["mlp_post", "attn_out"]) {
    const stats = data[kind];
    const layers = stats.mean.map((_, i) => i);
    const traces = stats.levels.map((level, j) => ({ type: "scatter", mode: "lines", name: `p${level}`, x: layers, y: stats.percentiles.map((row) => row[j]) }));
    traces.push({ type: "scatter", mode: "lines", name: "kurtosis", x: layers, y: stats.kurtosis, yaxis: "y2", line: { dash: "dot" } });
    plot(body, traces, { title: { text: `${kind}: value percentiles per layer` }, height: 260, yaxis2: { overlaying: "y", side: "right", title: { text: "excess kurtosis" } } });
  }
  plot(body, [{ type: "heatmap", z: data.resid_norms, colorscale: "Viridis" }], { title: { text: "‖resid_post‖ (layer × position)" }, height: 240 });
}

function positionTable(run, columns, values) {
  const rows = run.tokens.map((t, p) => [p, visible(t.text), ...values.map((v) => v[p])]).slice(1);
  return sortableTable([{ name: "pos", digits: 0 }, { name: "token" }, ...columns.map((name) => ({ name }))], rows, (r) => select({ pos: r[0], positions: [] }));
}

async function entropyCurve(body, run) {
  const s = run.signals; const n = run.tokens.length;
  const x = Array.from({ length: n - 1 }, (_, i) => i + 1);
  const entropy = [null, ...s.entropy.slice(0, n - 1)]; const surprisal = [null, ...s.surprisal.slice(0, n - 1)];
  const div = plot(body, [
    { type: "scatter", mode: "lines+markers", name: "entropy", x, y: entropy.slice(1), text: x.map((p) => esc(tokLabel(run, p))), hovertemplate: "%{text}: %{y:.3f} nats<extra></extra>" },
    { type: "scatter", mode: "lines", name: "surprisal", x, y: surprisal.slice(1), line: { dash: "dot" } },
  ], { title: { text: "entropy of the distribution each token was predicted from (nats)" }, height: 280,
    shapes: selection.pos ? [{ type: "line", x0: selection.pos, x1: selection.pos, yref: "paper", y0: 0, y1: 1, line: { color: "#c33" } }] : [] });
  div.on("plotly_click", (e) => select({ pos: e.points[0].x, positions: [] }));
  const table = positionTable(run, ["entropy", "surprisal"], [entropy, surprisal]);
  table.id = "entropy-table";
  body.append(table);
}

async function confidence(body, run) {
  const s = run.signals; const n = run.tokens.length;
  const x = Array.from({ length: n - 1 }, (_, i) => i + 1);
  const p = x.map((q) => (s.surprisal[q - 1] === null ? null : Math.exp(-s.surprisal[q - 1])));
  const div = plot(body, [
    { type: "bar", name: "p(token)", x, y: p, marker: { color: p.map((v) => greenRed(1 - (v ?? 0))) }, text: x.map((q) => esc(tokLabel(run, q))), hovertemplate: "%{text}: %{y:.3f}<extra></extra>" },
    { type: "scatter", mode: "lines", name: "top-1 p", x, y: x.map((q) => s.top1[q - 1]) },
    { type: "scatter", mode: "lines", name: "margin p₁−p₂", x, y: x.map((q) => s.margin[q - 1]), line: { dash: "dot" } },
  ], { title: { text: "confidence per token" }, height: 300, yaxis: { range: [0, 1] } });
  div.on("plotly_click", (e) => select({ pos: e.points[0].x, positions: [] }));
  const [interactive, toggle] = circuitsvisToggle("mv-topk-cv", "top-10 next tokens at every position (circuitsvis)");
  controls(body, toggle);
  if (interactive) await circuitsvisView(body, `/api/runs/${run.id}/views/topk-tokens`, undefined, "cv-topk-tokens");
}

async function attribution(body, run) {
  if (needsToken(body)) return;
  const method = localStorage.getItem("mv-attr") || "gradient_x_input";
  const key = `${run.id}/attr/${selection.pos}/${method}`;
  const button = el("button", "Compute"); button.type = "button"; button.id = "attribution-run";
  const out = el("div");
  async function show() {
    const data = await memo(key, () => postJSON(`/api/runs/${run.id}/attribution`, { position: selection.pos, method }));
    const x = data.scores.map((_, p) => p);
    out.replaceChildren();
    plot(out, [{ type: "bar", x, y: data.scores, text: x.map((p) => esc(tokLabel(run, p))), hovertemplate: "%{text}: %{y:.4f}<extra></extra>" }],
      { title: { text: `${method} toward ${esc(visible(run.tokens[selection.pos].text))} (${esc(data.score)} ${data.target_value.toFixed(2)})` }, height: 300 });
  }
  button.onclick = () => { button.disabled = true; show().finally(() => { button.disabled = false; }); };
  controls(body, selectBox("method", [["gradient_x_input", "gradient × input"], ["occlusion", "occlusion"]], method, (v) => { localStorage.setItem("mv-attr", v); select({}); }), button);
  body.append(out);
  if (cache.has(key)) await show();
}

async function repetition(body, run) {
  const rep = run.repetition; const P = run.prompt_length;
  const x = run.events.map((_, i) => P + i);
  const traces = [];
  if (rep.monitor) traces.push({ type: "scatter", mode: "lines", name: "monitor P(loop)", x, y: rep.monitor, line: { width: 3 } });
  if (rep.seed) traces.push({ type: "scatter", mode: "lines", name: "seed score / 4", x, y: rep.seed.score.map((v) => v / 4) });
  if (rep.labels) traces.push({ type: "scatter", mode: "lines", name: "in a loop (text)", x, y: rep.labels, line: { dash: "dot" } });
  const shapes = [];
  if (rep.alarm !== null && rep.alarm !== undefined) shapes.push({ type: "line", x0: P + rep.alarm, x1: P + rep.alarm, yref: "paper", y0: 0, y1: 1, line: { color: "#c00" } });
  plot(body, traces, { title: { text: `repetition monitor${rep.alarm !== null && rep.alarm !== undefined ? ` · alarm at token ${rep.alarm}` : " · no alarm"}${rep.onset !== null && rep.onset !== undefined ? ` · loop onset ${rep.onset}` : ""}` }, height: 280, shapes });
  if (rep.features) {
    const lanes = rep.features.map((values, i) => ({ type: "scatter", mode: "lines", name: rep.feature_names[i], x, y: values, xaxis: "x", yaxis: `y${i + 2}` }));
    const layout = { title: { text: "feature lanes" }, height: 70 * lanes.length + 60, showlegend: false, grid: { rows: lanes.length, columns: 1, pattern: "independent" } };
    lanes.forEach((lane, i) => { layout[`yaxis${i + 2}`] = { title: { text: rep.feature_names[i], font: { size: 9 } } }; lane.yaxis = `y${i + 2}`; lane.xaxis = `x${i + 2}`; });
    plot(body, lanes, layout);
  } else if (rep.monitor_error) body.append(el("p", `monitor unavailable: ${rep.monitor_error}`, "muted"));
}

async function interventions(body, run) {
  const input = el("input"); input.id = "ablate-heads"; input.size = 30;
  input.value = [...ticked].join(", ") || "0.0";
  input.title = "heads as layer.head, comma-separated (tick them in the head-entropy tab)";
  let method = localStorage.getItem("mv-ablate") || "zero";
  const go = el("button", "Ablate"); go.type = "button"; go.id = "ablate-run";
  const regen = el("button", "Regenerate as run B"); regen.type = "button"; regen.id = "ablate-regenerate";
  const out = el("div"); out.id = "ablation-output";
  const sweepButton = el("button", "Sweep every head"); sweepButton.type = "button"; sweepButton.id = "sweep-run";
  sweepButton.title = "ablate each head on its own; effect on p(selected token)";
  const progress = el("progress"); progress.id = "sweep-progress"; progress.value = 0; progress.max = 1;
  const heads = () => input.value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => s.split(".").map(Number));
  controls(body, el("span", "heads"), input, selectBox("method", [["zero", "zero"], ["mean", "mean"], ["resample", "resample"]], method, (v) => { method = v; localStorage.setItem("mv-ablate", v); }), go, regen);
  controls(body, sweepButton, progress);
  body.append(out);
  sweepButton.onclick = async () => {
    if (selection.pos === null || selection.pos < 1) { out.replaceChildren(el("p", "Select a token (not the first) to sweep.", "error")); return; }
    sweepButton.disabled = true;
    try {
      let result = null;
      await streamPost(`/api/runs/${run.id}/sweep`, { position: selection.pos, method }, (kind, data) => {
        if (kind === "progress") { progress.max = data.total; progress.value = data.done; }
        if (kind === "result") result = data;
        if (kind === "error") throw new Error(data.message);
      });
      out.replaceChildren(el("div", `p(${visible(run.tokens[selection.pos].text)}) = ${result.baseline.toFixed(4)} clean; ${result.method}-ablating one head at a time`, "muted"));
      const div = plot(out, [{ type: "heatmap", z: result.effect, colorscale: "RdBu", zmid: 0, hovertemplate: "L%{y} H%{x}: Δp %{z:.4f}<extra></extra>" }],
        { title: { text: "Δp per ablated head (click: tick it)" }, height: 320, xaxis: { title: { text: "head" } }, yaxis: { title: { text: "layer" } } });
      div.id = "sweep-plot";
      div.on("plotly_click", (e) => { const key = `${e.points[0].y}.${e.points[0].x}`; ticked.add(key); input.value = [...ticked].join(", "); });
    } catch (error) { out.replaceChildren(el("p", error.message, "error")); } finally { sweepButton.disabled = false; }
  };
  go.onclick = async () => {
    go.disabled = true;
    try {
      const data = await postJSON(`/api/runs/${run.id}/ablation`, { heads: heads(), method });
      view.delta = data.delta_p; view.differs = null;
      out.replaceChildren(el("div", data.description, "muted"));
      const x = data.delta_p.map((_, p) => p);
      plot(out, [{ type: "bar", x, y: data.delta_p, text: x.map((p) => esc(tokLabel(run, p))), hovertemplate: "%{text}: Δp %{y:.4f}<extra></extra>" }],
        { title: { text: "Δp of each token under the ablation" }, height: 300 });
      document.getElementById("colour").value = "delta"; select({ colour: "delta" }, { silent: true }); recolour();
    } catch (error) { out.replaceChildren(el("p", error.message, "error")); } finally { go.disabled = false; }
  };
  regen.onclick = async () => {
    regen.disabled = true;
    const tokens = [];
    try {
      let runB = null;
      await streamGenerate({ ...run.request, ablate: heads(), ablate_method: method === "resample" ? "zero" : method }, (kind, data) => {
        if (kind === "token") tokens.push(data);
        if (kind === "analysis") runB = data.run;
        if (kind === "error") throw new Error(data.message);
      });
      const b = await getJSON(`/api/runs/${runB}`);
      const P = run.prompt_length;
      view.differs = run.tokens.map((t, p) => p >= P && (!b.tokens[p] || b.tokens[p].id !== t.id));
      view.delta = run.tokens.map((t, p) => (p >= P && b.events[p - P] && run.events[p - P] ? b.events[p - P].entropy - run.events[p - P].entropy : null));
      const textB = el("pre"); textB.id = "run-b-text"; textB.textContent = b.generated_text;
      const diverge = view.differs.indexOf(true);
      out.replaceChildren(el("div", `run B (${b.id}) diverges at ${diverge < 0 ? "no position" : `position ${diverge}`}; Δ colour = entropy B − A`, "muted"), textB);
      select({ runB: b.id, colour: "delta" }, { silent: true }); document.getElementById("colour").value = "delta"; recolour();
    } catch (error) { out.replaceChildren(el("p", error.message, "error")); } finally { regen.disabled = false; }
  };
}

/** `picture` scaled into a canvas with `map` (rows × cols cells, row-major) as a red overlay
 * (alpha ∝ value / max), the cell grid, and yellow squares on the hotspots' centres. */
function overlay(picture, map, rows, cols, spots = []) {
  const canvas = el("canvas");
  const scale = Math.min(4, 420 / Math.max(picture.width, picture.height)) || 1;
  canvas.width = Math.round(picture.width * scale); canvas.height = Math.round(picture.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const peak = Math.max(1e-12, ...map);
  const cw = canvas.width / cols, ch = canvas.height / rows;
  map.forEach((v, cell) => {
    ctx.fillStyle = `rgba(230, 40, 40, ${(0.75 * v) / peak})`;
    ctx.fillRect((cell % cols) * cw, Math.floor(cell / cols) * ch, cw, ch);
  });
  ctx.strokeStyle = "rgba(255,255,255,0.5)";
  for (let r = 1; r < rows; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch); ctx.lineTo(canvas.width, r * ch); ctx.stroke(); }
  for (let c = 1; c < cols; c++) { ctx.beginPath(); ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, canvas.height); ctx.stroke(); }
  for (const spot of spots) {
    ctx.strokeStyle = "#ff0"; ctx.lineWidth = 2;
    ctx.strokeRect((spot.centre[1] + 0.5) * cw - 6, (spot.centre[0] + 0.5) * ch - 6, 12, 12);
  }
  return canvas;
}

async function vision(body, run) {
  if (!run.image_grid) { body.append(el("p", "This run has no image (vision tabs need a vision-language model and an uploaded image).", "muted")); return; }
  if (selection.pos === null) { body.append(el("p", "Select a token: the overlay shows where it looks in the image.", "muted")); return; }
  const layer = Math.min(selection.layer, run.n_layers - 1);
  const mode = localStorage.getItem("mv-vision") === "rollout" ? "rollout" : "attention";
  const [data, picture] = await Promise.all([
    memo(`${run.id}/vision/${selection.pos}/${layer}`, () => getJSON(`/api/runs/${run.id}/vision`, { position: selection.pos, layer })),
    memo(`${run.id}/image`, () => imageBitmap(`/api/runs/${run.id}/image`)),
  ]);
  const head = typeof selection.head === "number" ? selection.head : "mean";
  controls(body,
    selectBox("overlay", [["attention", "attention at a layer"], ["rollout", "vision rollout (all layers + vision encoder)"]], mode,
      (v) => { localStorage.setItem("mv-vision", v); select({}); }),
    layerSelect(run), selectBox("head", [["mean", "mean"], ...data.maps.map((_, h) => [h, `head ${h}`])], head,
      (v) => select({ head: v === "mean" ? "mean" : Number(v) })));
  if (mode === "rollout") {
    let rolled;
    try {
      rolled = await memo(`${run.id}/vision-rollout/${selection.pos}`, () => getJSON(`/api/runs/${run.id}/vision-rollout`, { position: selection.pos }));
    } catch (error) { body.append(el("p", `vision rollout unavailable: ${error.message}`, "muted")); return; }
    const canvas = overlay(picture, rolled.map, rolled.patch_rows, rolled.patch_cols);
    canvas.id = "vision-rollout-overlay";
    body.append(canvas, el("div", `vision rollout of ${tokLabel(run, selection.pos)}: its language-model rollout into the image tokens (${(100 * rolled.image_mass).toFixed(1)} % of it), carried through vision layers ${rolled.vision_layers.join(", ")} onto ${rolled.patch_rows}×${rolled.patch_cols} patches; red = share of the image's part`, "muted"));
  } else {
    const map = head === "mean" ? data.mean_map : data.maps[head];
    const canvas = overlay(picture, map, data.rows, data.cols, data.hotspots);
    canvas.id = "vision-overlay";
    body.append(canvas, el("div", `grid ${data.rows}×${data.cols}; ${tokLabel(run, selection.pos)} at layer ${layer}; red = attention renormalised over the image; yellow squares = hotspots`, "muted"));
  }
  const rows = data.maps.map((_, h) => [h, data.image_mass[h], ...["normalised_entropy", "gini", "k90_fraction", "peak_to_mean", "spatial_variance"].map((k) => data.metrics[k][h])]);
  body.append(el("div", `region metrics of each head's attention at layer ${layer}`, "muted"));
  body.append(sortableTable([{ name: "head", digits: 0 }, { name: "image mass" }, { name: "entropy (norm.)" }, { name: "gini" }, { name: "k90 share" }, { name: "peak/mean" }, { name: "spatial var." }], rows,
    (r) => select({ head: r[0] })));
}

async function imageBitmap(path) {
  const response = await fetch(path, { headers: { "X-Mechvis-Token": token() } });
  if (!response.ok) throw new Error(`image ${response.status}`);
  return createImageBitmap(await response.blob());
}

async function rolloutTab(body, run) {
  if (selection.pos === null) { body.append(el("p", "Select a token.", "muted")); return; }
  const data = await memo(`${run.id}/rollout/${selection.pos}`, () => getJSON(`/api/runs/${run.id}/rollout`, { position: selection.pos }));
  const x = data.row.map((_, p) => p);
  plot(body, [{ type: "bar", x, y: data.row, text: x.map((p) => esc(tokLabel(run, p))), hovertemplate: "%{text}: %{y:.4f}<extra></extra>" }],
    { title: { text: `attention rollout row of ${esc(visible(run.tokens[selection.pos].text))}` }, height: 300 });
}

export const TABS = [
  ["attention", "1 Attention", attention], ["heads", "2 Heads", allHeads], ["entropy", "3 Head entropy", headEntropy],
  ["similarity", "4 Layer similarity", similarity], ["dla", "5 Contributions", dla], ["lens", "6 Logit lens", lens],
  ["distribution", "7 Distribution", distribution], ["projection", "8 Projection", projection], ["activations", "9 Activations", activations],
  ["entropy-curve", "10 Entropy", entropyCurve], ["confidence", "11 Confidence", confidence], ["attribution", "12 Attribution", attribution],
  ["repetition", "13 Repetition", repetition], ["interventions", "14 Interventions", interventions], ["vision", "15 Vision", vision],
  ["rollout", "16 Rollout", rolloutTab],
];

let rendering = 0;
export async function renderTab(run) {
  const body = document.getElementById("tab-body");
  const ticket = ++rendering;
  for (const button of document.querySelectorAll("#tabs button")) button.setAttribute("aria-selected", String(button.dataset.tab === selection.tab));
  const entry = TABS.find((t) => t[0] === selection.tab) || TABS[0];
  const fresh = el("div"); fresh.dataset.tab = entry[0];
  afterAttach.length = 0;
  if (!run) { body.replaceChildren(el("p", "Generate something; the tabs fill in when the analysis is ready.", "muted")); return; }
  try {
    await entry[2](fresh, run);
  } catch (error) {
    fresh.append(el("p", `Could not draw this tab: ${error.message}`, "error"));
  }
  if (ticket === rendering) {
    body.replaceChildren(fresh);
    for (const div of fresh.querySelectorAll(".plot")) window.Plotly.Plots.resize(div);
    for (const callback of afterAttach.splice(0)) {
      try { callback(); } catch (error) { fresh.append(el("p", `Could not draw this view: ${error.message}`, "error")); }
    }
    body.dataset.ready = entry[0];
  }
}
