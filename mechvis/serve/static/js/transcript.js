// The transcript: every token a focusable element whose text is set with textContent only.
import { SAMPLED_NOT_TOP1, greenRed, diverging, legend } from "./colour.js";

export const view = { run: null, streaming: [], prompt: [], delta: null, differs: null };

const root = () => document.getElementById("transcript");

/** Per-position values of the colour mode (null: no colour). */
export function colourValues(mode) {
  const run = view.run;
  const n = run ? run.tokens.length : view.prompt.length + view.streaming.length;
  const values = new Array(n).fill(null);
  let maximum = 1;
  if (!run) {  // streaming: the events' values
    const offset = view.prompt.length;
    view.streaming.forEach((e, i) => { values[offset + i] = eventValue(e, mode); });
    if (mode === "entropy") maximum = Math.max(1e-9, ...values.filter((v) => v !== null));
    return { values, maximum };
  }
  const s = run.signals; const P = run.prompt_length;
  for (let p = 1; p < n; p++) {
    const event = p >= P ? run.events[p - P] : null;
    switch (mode) {
      case "default": values[p] = event ? (event.rank !== 0 ? 1 : null) : null; break;
      case "entropy": values[p] = s.entropy[p - 1]; break;
      case "probability": values[p] = s.surprisal[p - 1] === null ? null : Math.exp(-s.surprisal[p - 1]); break;
      case "gap": values[p] = s.margin[p - 1]; break;
      case "monitor": values[p] = p >= P && run.repetition.monitor ? run.repetition.monitor[p - P] : null; break;
      case "delta": values[p] = view.delta ? view.delta[p] : null; break;
      default: break;
    }
  }
  if (mode === "entropy") maximum = Math.max(1e-9, ...values.filter((v) => v !== null));
  if (mode === "delta") maximum = Math.max(1e-9, ...values.filter((v) => v !== null).map(Math.abs));
  return { values, maximum };
}

function eventValue(e, mode) {
  switch (mode) {
    case "default": return e.rank !== 0 ? 1 : null;
    case "entropy": return e.entropy;
    case "probability": return e.p;
    case "gap": return e.margin;
    case "monitor": return e.monitor;
    default: return null;
  }
}

function cssFor(mode, value, maximum) {
  if (value === null || value === undefined) return "";
  switch (mode) {
    case "default": return SAMPLED_NOT_TOP1;
    case "entropy": return greenRed(value / maximum);
    case "probability": case "gap": return greenRed(1 - value);
    case "monitor": return greenRed(value);
    case "delta": return diverging(value / maximum);
    default: return "";
  }
}

export function visible(text) {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→");
}

function tokenElement(position, text, classes) {
  const span = document.createElement("span");
  span.className = `tok ${classes}`;
  span.tabIndex = -1;
  span.dataset.pos = String(position);
  span.textContent = text === "" ? "∅" : text;
  return span;
}

export function render() {
  const element = root();
  const items = [];
  if (view.run) {
    const run = view.run;
    const starts = new Set(run.spans.map((s) => s.start));
    const spanOf = run.spans;
    for (let p = 0; p < run.tokens.length; p++) {
      const token = run.tokens[p];
      if (token.segment === "image") {
        const span = spanOf.find((s) => s.start <= p && p < s.stop);
        if (p === span.start) {
          const grid = run.image_grid;
          const chip = tokenElement(p, grid ? `[image ${grid.rows}×${grid.cols}]` : `[image ${span.stop - span.start} tokens]`, "image");
          items.push(chip);
        }
        continue;
      }
      const classes = [token.special ? "special" : "", starts.has(p) && p > 0 ? "boundary" : "", `seg-${token.segment}`].join(" ");
      const el = tokenElement(p, token.text, classes);
      el.title = `${token.segment} · position ${p} · id ${token.id}`;
      items.push(el);
    }
  } else {
    view.prompt.forEach((text, p) => items.push(tokenElement(p, text, "prompt")));
    view.streaming.forEach((e) => items.push(tokenElement(e.position, e.text, "streaming")));
  }
  element.replaceChildren(...items);
  recolour();
}

/** Append one streamed token (≤ 2 ms: one element, one style). */
export function appendToken(event) {
  view.streaming.push(event);
  const el = tokenElement(event.position, event.text, "streaming");
  const mode = document.getElementById("colour").value;
  const value = eventValue(event, mode);
  if (value !== null) el.style.background = cssFor(mode, mode === "entropy" ? value / 5 : value, 1);
  root().append(el);
}

export function recolour() {
  const mode = document.getElementById("colour").value;
  const { values, maximum } = colourValues(mode);
  for (const el of root().querySelectorAll(".tok")) {
    const p = Number(el.dataset.pos);
    el.style.background = cssFor(mode, values[p], maximum);
    el.style.outline = mode === "delta" && view.differs && view.differs[p] ? "2px solid rgb(200,40,40)" : "";
  }
  legend(document.getElementById("legend"), mode, maximum);
}

export function markSelection(pos, positions) {
  for (const el of root().querySelectorAll(".tok.selected, .tok.multi")) el.classList.remove("selected", "multi");
  for (const p of positions) root().querySelector(`.tok[data-pos="${p}"]`)?.classList.add("multi");
  const el = root().querySelector(`.tok[data-pos="${pos}"]`);
  if (el) { el.classList.add("selected"); el.scrollIntoView({ block: "nearest" }); }
}

/** The repetition lane: monitor probability per generated token, the alarm and the loop onset. */
export function drawLane() {
  const canvas = document.getElementById("lane");
  const width = canvas.clientWidth || 600;
  canvas.width = width;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, canvas.height);
  const rep = view.run ? view.run.repetition : null;
  const values = rep && rep.monitor ? rep.monitor : view.streaming.map((e) => e.monitor).filter((v) => v !== null && v !== undefined);
  if (!values.length) {
    ctx.fillStyle = "#888"; ctx.font = "11px sans-serif";
    ctx.fillText(rep && rep.monitor_error ? `monitor unavailable: ${rep.monitor_error}`.slice(0, 120) : "no monitor values yet", 4, 28);
    return;
  }
  const step = width / values.length; const h = canvas.height;
  values.forEach((v, i) => { ctx.fillStyle = greenRed(v); ctx.fillRect(i * step, h * (1 - v), Math.max(1, step - 0.5), h * v); });
  if (rep && rep.alarm !== null && rep.alarm !== undefined) {
    ctx.strokeStyle = "#c00"; ctx.lineWidth = 2; ctx.beginPath(); ctx.moveTo(rep.alarm * step, 0); ctx.lineTo(rep.alarm * step, h); ctx.stroke();
    ctx.fillStyle = "#c00"; ctx.fillText("alarm", rep.alarm * step + 3, 10);
  }
  if (rep && rep.onset !== null && rep.onset !== undefined) {
    ctx.strokeStyle = "#333"; ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(rep.onset * step, 0); ctx.lineTo(rep.onset * step, h); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = "#333"; ctx.fillText("loop onset", rep.onset * step + 3, h - 3);
  }
}
