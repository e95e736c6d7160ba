// One selection drives every tab; it is mirrored in the URL hash (reload or a shared link restores it).
const listeners = new Set();
export const selection = { run: null, runB: null, pos: null, positions: [], layer: 0, head: "mean", tab: "attention", colour: "default" };

export function onChange(listener) { listeners.add(listener); }

export function select(changes, { silent = false } = {}) {
  Object.assign(selection, changes);
  writeHash();
  if (!silent) for (const listener of listeners) listener(selection, changes);
}

function writeHash() {
  const parts = { run: selection.run, b: selection.runB, pos: selection.pos, sel: selection.positions.join(","),
    layer: selection.layer, head: selection.head, tab: selection.tab, colour: selection.colour };
  const text = Object.entries(parts).filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
  history.replaceState(null, "", `${location.pathname}${location.search}#${text}`);
}

export function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const int = (value) => (value === null || value === "" || Number.isNaN(Number(value)) ? null : Number(value));
  const run = params.get("run");
  if (run && /^[0-9a-f]{12}$/.test(run)) selection.run = run;
  const runB = params.get("b");
  if (runB && /^[0-9a-f]{12}$/.test(runB)) selection.runB = runB;
  if (int(params.get("pos")) !== null) selection.pos = int(params.get("pos"));
  if (params.get("sel")) selection.positions = params.get("sel").split(",").map(Number).filter(Number.isInteger);
  if (int(params.get("layer")) !== null) selection.layer = int(params.get("layer"));
  const head = params.get("head");
  if (head) selection.head = ["mean", "max"].includes(head) ? head : (int(head) ?? "mean");
  if (params.get("tab")) selection.tab = params.get("tab");
  if (params.get("colour")) selection.colour = params.get("colour");
}
