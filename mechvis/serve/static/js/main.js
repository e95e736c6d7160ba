// Wiring: the prompt box, generation stream, selection, keyboard, splitter, tabs, export.
import { ApiError, getJSON, postImage, stop, streamGenerate, token } from "./api.js";
import { inspect } from "./inspector.js";
import { onChange, readHash, select, selection } from "./state.js";
import { TABS, renderTab } from "./tabs.js";
import { appendToken, drawLane, markSelection, recolour, render, view } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const messages = [];  // chat history: {role, content}
let imageId = null;
let generating = false;
let controller = null;

function setStatus(text, kind = text) {
  const status = $("server-status");
  status.textContent = text; status.className = `status ${kind}`;
}

function showError(message) { $("error").textContent = message || ""; }

async function loadCard() {
  const state = await getJSON("/api/state");
  const card = $("card");
  card.replaceChildren();
  if (!state.model) { card.textContent = "no model loaded"; return state; }
  const m = state.model;
  const fields = [["model", m.name], ["architecture", m.architecture], ["layers", m.n_layers], ["heads", m.n_heads], ["KV heads", m.n_kv_heads],
    ["d_model", m.d_model], ["vocabulary", m.d_vocab], ["context", m.n_ctx], ["VLM", m.vlm ? "yes" : "no"]];
  for (const [name, value] of fields) {
    const span = document.createElement("span"); const b = document.createElement("b");
    b.textContent = `${name} `; span.append(b, String(value)); card.append(span);
  }
  document.body.classList.toggle("vlm", Boolean(m.vlm));
  setStatus(state.status);
  return state;
}

function requestBody() {
  const number = (id) => Number($(id).value);
  const chat = document.querySelector('input[name="mode"]:checked').value === "chat";
  const body = {
    mode: chat ? "chat" : "completion", prompt: $("prompt").value, system: chat ? $("system").value : "",
    messages: chat ? messages.slice() : [], max_new_tokens: number("max_new_tokens"), temperature: number("temperature"),
    top_k: number("top_k"), top_p: number("top_p"), min_p: number("min_p"), schedule: $("schedule").value,
  };
  if ($("seed").value !== "") body.seed = number("seed");
  if (imageId) body.image_id = imageId;
  return body;
}

function validControls() {
  for (const input of document.querySelectorAll(".controls input")) {
    if (!input.checkValidity()) { showError(`${input.parentElement.firstChild.textContent.trim()}: ${input.validationMessage}`); input.focus(); return false; }
  }
  return true;
}

function renderMessages() {
  $("messages").replaceChildren(...messages.map((m) => { const d = document.createElement("div"); d.className = `message ${m.role}`; d.textContent = `${m.role}: ${m.content}`; return d; }));
}

async function send() {
  if (generating) return;
  showError("");
  if (!validControls()) return;
  const body = requestBody();
  if (!body.prompt && !(body.mode === "chat" && body.messages.length)) { showError("Type a prompt first."); return; }
  generating = true; $("send").disabled = true; $("stop").disabled = false;
  delete document.body.dataset.analysis; delete document.body.dataset.stopped;
  setStatus("generating");
  view.run = null; view.streaming = []; view.prompt = []; view.delta = null; view.differs = null;
  render();
  controller = new AbortController();
  let runId = null; let generated = ""; let analysed = false;
  try {
    await streamGenerate(body, (kind, data) => {
      if (kind === "start") { runId = data.run; view.prompt = data.prompt_tokens || []; render(); }
      else if (kind === "token") { appendToken(data); generated += data.text; }
      else if (kind === "stopped") { setStatus("analysing"); $("run-info").textContent = `stopped: ${data.reason === "context" ? "the context is full" : data.reason}${data.ms_per_token ? ` · ${data.ms_per_token.toFixed(1)} ms/token` : ""}`; document.body.dataset.stopped = data.reason; }
      else if (kind === "analysis") { runId = data.run; analysed = true; }
      else if (kind === "error") { showError(data.message); }
    }, controller.signal);
    if (body.mode === "chat" && analysed) {
      messages.push({ role: "user", content: body.prompt });
      if (generated) messages.push({ role: "assistant", content: generated });
      renderMessages();
    }
    if (analysed && !$("error").textContent) { $("prompt").value = body.mode === "chat" ? "" : $("prompt").value; await openRun(runId, { pos: null }); }
  } catch (error) {
    if (error.name === "AbortError") { /* stopped */ }
    else if (error instanceof ApiError && error.status === 409) { setStatus("busy", "busy"); showError("busy: another generation is running"); }
    else showError(error.message);
  } finally {
    generating = false; $("send").disabled = false; $("stop").disabled = true;
    if ($("server-status").textContent !== "busy") setStatus("idle");
  }
}

async function openRun(runId, changes = {}) {
  const run = await getJSON(`/api/runs/${runId}`);
  view.run = run; view.streaming = [];
  document.body.dataset.run = runId;
  $("run-info").textContent = `run ${runId} · ${run.tokens.length} tokens`;
  render(); drawLane();
  select({ run: runId, ...changes });
  document.body.dataset.analysis = runId;
}

function moveToken(step) {
  const n = view.run ? view.run.tokens.length : 0;
  if (!n) return;
  select({ pos: Math.min(n - 1, Math.max(0, (selection.pos ?? -1) + step)), positions: [] });
}

function setupKeys() {
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
    if (e.key === "Escape") { e.preventDefault(); halt(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { halt(); return; }
    if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName) || e.target.id === "splitter") return;
    if (e.key === "ArrowRight") { moveToken(1); e.preventDefault(); }
    if (e.key === "ArrowLeft") { moveToken(-1); e.preventDefault(); }
    if (e.key === "]" && view.run) select({ layer: Math.min(view.run.n_layers - 1, selection.layer + 1) });
    if (e.key === "[" && view.run) select({ layer: Math.max(0, selection.layer - 1) });
  });
}

async function halt() {
  if (!generating) return;
  try { await stop(); } catch (e) { /* the stream reports */ }
}

function setupTranscript() {
  $("transcript").addEventListener("click", (e) => {
    const token = e.target.closest(".tok");
    if (!token) return;
    const pos = Number(token.dataset.pos);
    if (e.shiftKey && selection.pos !== null) {
      const positions = new Set(selection.positions.length ? selection.positions : [selection.pos]);
      if (positions.has(pos)) positions.delete(pos); else positions.add(pos);
      select({ positions: [...positions].sort((a, b) => a - b) });
    } else select({ pos, positions: [] });
    token.focus();
  });
  $("colour").addEventListener("change", () => { select({ colour: $("colour").value }, { silent: true }); recolour(); });
}

function setupSplitter() {
  const root = document.documentElement;
  const saved = Number(localStorage.getItem("mv-right-width"));
  if (saved) root.style.setProperty("--right", `${saved}px`);
  const width = () => $("right").getBoundingClientRect().width;
  const set = (px) => {
    const clamped = Math.max(260, Math.min(window.innerWidth - 420, px));
    root.style.setProperty("--right", `${clamped}px`); localStorage.setItem("mv-right-width", String(Math.round(clamped)));
    $("splitter").setAttribute("aria-valuenow", String(Math.round(clamped)));
  };
  const splitter = $("splitter");
  splitter.addEventListener("pointerdown", (e) => {
    splitter.setPointerCapture(e.pointerId);
    const move = (m) => set(window.innerWidth - m.clientX);
    const up = () => { splitter.removeEventListener("pointermove", move); splitter.removeEventListener("pointerup", up); renderTab(view.run); };
    splitter.addEventListener("pointermove", move); splitter.addEventListener("pointerup", up);
  });
  splitter.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") { set(width() + 20); e.preventDefault(); }
    if (e.key === "ArrowRight") { set(width() - 20); e.preventDefault(); }
  });
  $("maximise").addEventListener("click", () => $("right").classList.toggle("max"));
}

function setupTabs() {
  const nav = $("tabs");
  for (const [id, title] of TABS) {
    const button = document.createElement("button");
    button.type = "button"; button.role = "tab"; button.dataset.tab = id; button.textContent = title;
    button.onclick = () => select({ tab: id });
    nav.append(button);
  }
}

function setupMode() {
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => document.body.classList.toggle("chat", radio.value === "chat" && radio.checked));
  }
}

function setupImage() {
  const take = async (file) => {
    if (!file) return;
    if (file.size > 10 * 1024 * 1024) { showError("The image is larger than 10 MiB."); return; }
    try { const uploaded = await postImage(file); imageId = uploaded.id; $("dropzone").firstChild.textContent = `image ${uploaded.width}×${uploaded.height} ready `; }
    catch (error) { showError(error.message); }
  };
  $("image-input").addEventListener("change", (e) => take(e.target.files[0]));
  $("dropzone").addEventListener("dragover", (e) => e.preventDefault());
  $("dropzone").addEventListener("drop", (e) => { e.preventDefault(); take(e.dataTransfer.files[0]); });
}

function setupExport() {
  const download = async (suffix) => {
    if (!view.run) { showError("Nothing to export yet."); return; }
    // the current view: the selected layer joins the report's attention layers; the JSON records the selection
    const params = suffix === "html" ? { layer: selection.layer }
      : Object.fromEntries(Object.entries({ pos: selection.pos, layer: selection.layer, head: selection.head, tab: selection.tab }).filter(([, v]) => v !== null && v !== undefined));
    $("export").open = false; setStatus("exporting", "analysing");
    let response;
    try { response = await fetch(`/api/runs/${view.run.id}/export.${suffix}?${new URLSearchParams(params)}`, { headers: { "X-Mechvis-Token": token() } }); }
    finally { setStatus("idle"); }
    if (!response.ok) { showError(await response.json().then((b) => (typeof b.detail === "string" ? b.detail : JSON.stringify(b.detail)), () => response.statusText)); return; }
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a"); link.href = url; link.download = `mechvis-${view.run.id}.${suffix}`; link.click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  };
  $("export-html").addEventListener("click", () => download("html"));
  $("export-json").addEventListener("click", () => download("json"));
}

onChange((sel, changes) => {
  if ("pos" in changes || "positions" in changes) { markSelection(sel.pos, sel.positions); inspect(sel.pos); }
  $("colour").value = sel.colour;
  renderTab(view.run);
});

async function start() {
  setupTabs(); setupKeys(); setupTranscript(); setupSplitter(); setupMode(); setupImage(); setupExport();
  readHash();
  $("colour").value = selection.colour;
  await loadCard();
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", halt);
  if (selection.run) {
    try { await openRun(selection.run, { pos: selection.pos }); markSelection(selection.pos, selection.positions); inspect(selection.pos); }
    catch (error) { showError(`The linked run is gone (${error.message}); generate again.`); selection.run = null; renderTab(null); }
  } else renderTab(null);
  document.body.dataset.ready = "1";
}

start();
