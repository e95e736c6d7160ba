// The token inspector: everything about one token, text only through textContent.
import { getJSON } from "./api.js";
import { view, visible } from "./transcript.js";

const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v) ? "—" : Number(v).toFixed(digits));

function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (className) e.className = className;
  return e;
}

function row(table, name, value) {
  const tr = el("tr"); tr.append(el("th", name), el("td", value)); table.append(tr);
}

/** The distribution rows: top-N with the sampled token marked, entries cut by top-k / top-p dimmed. */
function distribution(ids, probs, texts, sampled, request) {
  const box = el("div");
  let cumulative = 0;
  ids.forEach((id, rank) => {
    const p = probs[rank];
    const cut = request && ((request.top_k > 0 && rank >= request.top_k) || (request.top_p < 1 && cumulative >= request.top_p));
    cumulative += p;
    const line = el("div", undefined, `dist-row${id === sampled ? " sampled" : ""}${cut ? " cut" : ""}`);
    const bar = el("span", undefined, "bar"); bar.style.width = `${Math.max(1, p * 160)}px`;
    line.append(el("span", `${id === sampled ? "▶" : " "} ${fmt(p, 3)}`), bar, el("span", visible(texts[id] ?? `#${id}`), "ws"));
    line.dataset.p = String(p);
    line.title = cut ? "outside the top-k / top-p cut" : "";
    box.append(line);
  });
  return box;
}

export async function inspect(pos) {
  const box = document.getElementById("inspector");
  const run = view.run;
  if (pos === null || pos === undefined) { box.replaceChildren(el("p", "Click a token.", "muted")); return; }
  const streamed = !run ? view.streaming.find((e) => e.position === pos) : null;
  const token = run ? run.tokens[pos] : (streamed ? { id: streamed.id, text: streamed.text, segment: "generated" } : { id: null, text: view.prompt[pos] ?? "", segment: "prompt" });
  if (!token) return;
  const P = run ? run.prompt_length : view.prompt.length;
  const event = run ? run.events[pos - P] : streamed;
  const table = el("table");
  row(table, "token", visible(token.text));
  row(table, "id", String(token.id));
  row(table, "bytes", Array.from(new TextEncoder().encode(token.text), (b) => b.toString(16).padStart(2, "0")).join(" "));
  row(table, "position", String(pos));
  row(table, "segment", token.segment);
  const texts = { ...(run ? run.texts : {}), ...(event && event.top_texts ? Object.fromEntries(event.top_ids.map((id, i) => [id, event.top_texts[i]])) : {}) };
  let ids, probs;
  if (run && pos > 0) {
    const s = run.signals;
    const surprisal = s.surprisal[pos - 1];
    row(table, "log p", fmt(surprisal === null ? null : -surprisal));
    row(table, "surprisal", `${fmt(surprisal)} nats`);
    row(table, "entropy", `${fmt(s.entropy[pos - 1])} nats`);
    row(table, "varentropy", `${fmt(s.varentropy[pos - 1])} nats²`);
    row(table, "margin p₁−p₂", fmt(s.margin[pos - 1]));
    ids = s.top_ids[pos - 1]; probs = s.top_probs[pos - 1];
    const rank = event ? event.rank : ids.indexOf(token.id);
    row(table, "rank", rank >= 0 ? String(rank) : "> 10");
  } else if (event) {
    row(table, "log p", fmt(Math.log(event.p)));
    row(table, "entropy", `${fmt(event.entropy)} nats`);
    row(table, "varentropy", `${fmt(event.varentropy)} nats²`);
    row(table, "margin p₁−p₂", fmt(event.margin));
    row(table, "rank", String(event.rank));
  }
  if (event) {
    row(table, "temperature", fmt(event.temperature, 3));
    row(table, "monitor P(loop)", fmt(event.monitor ?? (run && run.repetition.monitor ? run.repetition.monitor[pos - P] : null), 3));
    ids = event.top_ids; probs = event.top_probs;
  }
  const parts = [table];
  if (ids) {
    parts.push(el("div", `top-${ids.length} (sum ${fmt(probs.reduce((a, b) => a + b, 0), 3)})`, "muted"));
    parts.push(distribution(ids, probs, texts, token.id, run ? run.request : null));
    parts[parts.length - 1].id = "inspector-distribution";
  }
  box.replaceChildren(...parts);
  box.dataset.pos = String(pos);
  if (run && pos > 0) {
    const lens = await lensRow(run.id, pos - 1);  // one position: the whole run's lens is tab 6's
    if (view.run !== run || box.dataset.pos !== String(pos)) return;  // another token was clicked meanwhile
    const list = el("div"); list.id = "inspector-lens";
    list.append(el("div", "logit lens (top-3 predicting this token, per layer)", "muted"));
    lens.labels.forEach((label, layer) => {
      const tops = lens.top_tokens[layer][0].map((t, k) => `${visible(t)} ${fmt(lens.top_probs[layer][0][k], 2)}`);
      list.append(el("div", `${label.padEnd(6)} ${tops.join(" | ")}`, "dist-row"));
    });
    box.append(list);
  }
}

const rowCache = new Map();
/** The logit lens at one position (cached; the whole run's, when tab 6 fetched it, is sliced instead). */
function lensRow(runId, position) {
  if (lensCache.has(runId)) {
    return lensCache.get(runId).then((lens) => {
      const index = lens.positions.indexOf(position);
      return { labels: lens.labels, top_tokens: lens.top_tokens.map((layer) => [layer[index]]), top_probs: lens.top_probs.map((layer) => [layer[index]]) };
    });
  }
  const key = `${runId}/${position}`;
  if (!rowCache.has(key)) rowCache.set(key, getJSON(`/api/runs/${runId}/lens`, { position }).catch((e) => { rowCache.delete(key); throw e; }));
  if (rowCache.size > 256) rowCache.delete(rowCache.keys().next().value);
  return rowCache.get(key);
}

const lensCache = new Map();
export function lensFor(runId) {
  if (!lensCache.has(runId)) lensCache.set(runId, getJSON(`/api/runs/${runId}/lens`));
  return lensCache.get(runId);
}
