// Talking to the server: JSON, binary attention layers, and the generation stream (POST + reader).
let secret = document.querySelector('meta[name="mechvis-token"]').content;
if (!secret) {  // a non-loopback server: the token comes in the printed URL, then leaves the address bar
  const params = new URLSearchParams(location.search);
  secret = params.get("token") || sessionStorage.getItem("mechvis-token") || "";
  if (params.has("token")) {
    sessionStorage.setItem("mechvis-token", secret);
    history.replaceState(null, "", location.pathname + location.hash);
  }
}
/** The per-process token (for requests made outside these helpers: downloads, images). */
export const token = () => secret;
const headers = () => ({ "X-Mechvis-Token": secret });

export class ApiError extends Error {
  constructor(status, detail) { super(typeof detail === "string" ? detail : JSON.stringify(detail)); this.status = status; }
}

async function check(response) {
  if (response.ok) return response;
  let detail = response.statusText;
  try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
  if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  throw new ApiError(response.status, detail);
}

export async function getJSON(path, params) {
  const url = params ? `${path}?${new URLSearchParams(params)}` : path;
  return (await check(await fetch(url, { headers: headers() }))).json();
}

export async function postJSON(path, body) {
  const response = await fetch(path, { method: "POST", headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return (await check(response)).json();
}

export async function postImage(file) {
  const response = await fetch("/api/images", { method: "POST", headers: { ...headers(), "Content-Type": file.type || "image/png" }, body: file });
  return (await check(response)).json();
}

const layerCache = new Map();
/** One layer's attention as {shape: [heads, n, n], data: Uint8Array}; cached per run and layer. */
export async function attentionLayer(runId, layer) {
  const key = `${runId}/${layer}`;
  if (!layerCache.has(key)) {
    layerCache.set(key, (async () => {
      const response = await check(await fetch(`/api/runs/${runId}/attention/${layer}`, { headers: headers() }));
      const shape = response.headers.get("X-Shape").split(",").map(Number);
      return { shape, data: new Uint8Array(await response.arrayBuffer()) };
    })());
    if (layerCache.size > 8) layerCache.delete(layerCache.keys().next().value);
  }
  return layerCache.get(key);
}

/** POST /api/generate and call onEvent(kind, data) for each server-sent event. */
export async function streamGenerate(body, onEvent, signal) { return streamPost("/api/generate", body, onEvent, signal); }

/** POST `path` (a route answering with server-sent events) and call onEvent(kind, data) per event. */
export async function streamPost(path, body, onEvent, signal) {
  const response = await check(await fetch(path, {
    method: "POST", headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message"; let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(kind, JSON.parse(data));
    }
  }
}

export async function stop() { return postJSON("/api/stop", {}); }
