// Canvas drawing: attention heatmaps from uint8 rows (ImageData, a few ms at 512²) and a rotatable 3-D scatter.
import { greenRed } from "./colour.js";

const PALETTE = (() => {  // white → dark blue, 256 entries
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    table[i * 3] = 255 - t * 230; table[i * 3 + 1] = 255 - t * 200; table[i * 3 + 2] = 255 - t * 90;
  }
  return table;
})();

/**
 * Draw an n×n attention matrix. `values(q, k)` is never called: `matrix` is a Uint8Array (n*n)
 * of value·255. Options: log scale, hidden columns (sinks), the outlined query row.
 */
export function drawHeatmap(canvas, matrix, n, { log = false, hide = [], row = null } = {}) {
  canvas.width = n; canvas.height = n;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(n, n);
  // One 32-bit RGBA word per pixel from a 256-entry table (the value → colour map with the log
  // scale applied): written byte by byte into the table, so the words are in the canvas's byte
  // order on any platform. ~10× fewer operations per pixel than four palette look-ups.
  let scale = 1;
  const hidden = new Uint8Array(n);
  for (const k of hide) if (k >= 0 && k < n) hidden[k] = 1;
  if (hide.length) {  // renormalise the colour range without the hidden columns
    let maximum = 1;
    for (let q = 0; q < n; q++) for (let k = 0, i = q * n; k < n; k++, i++) if (!hidden[k] && matrix[i] > maximum) maximum = matrix[i];
    scale = 255 / maximum;
  }
  const bytes = new Uint8Array(257 * 4);  // entry 256: a hidden column (value 0)
  for (let v = 0; v <= 256; v++) {
    const i = v === 256 ? 0 : v;
    const shade = log ? (i === 0 ? 0 : Math.round(255 * (Math.log(i) / Math.log(255)))) : i;
    bytes[v * 4] = PALETTE[shade * 3]; bytes[v * 4 + 1] = PALETTE[shade * 3 + 1]; bytes[v * 4 + 2] = PALETTE[shade * 3 + 2]; bytes[v * 4 + 3] = 255;
  }
  const colours = new Uint32Array(bytes.buffer);
  const pixels = new Uint32Array(image.data.buffer);
  if (scale === 1 && !hide.length) {
    for (let i = 0; i < n * n; i++) pixels[i] = colours[matrix[i]];
  } else {
    const index = new Uint16Array(256);  // value → entry after renormalisation
    for (let v = 0; v < 256; v++) index[v] = Math.min(255, Math.round(v * scale));
    for (let q = 0; q < n; q++) {
      for (let k = 0, i = q * n; k < n; k++, i++) pixels[i] = colours[hidden[k] ? 256 : index[matrix[i]]];
    }
  }
  ctx.putImageData(image, 0, 0);
  if (row !== null && row < n) {
    ctx.strokeStyle = "rgba(230, 40, 40, 0.9)"; ctx.lineWidth = Math.max(1, n / 200);
    ctx.strokeRect(0, row, n, 1);
  }
}

/** Head-combined matrix (mean or max) of [heads, n, n] uint8 data: the mean rounded to the
 * nearest integer. */
export function combineHeads(data, heads, n, how) {
  if (typeof how === "number") return data.subarray(how * n * n, (how + 1) * n * n);
  const size = n * n;
  if (how === "max") {
    const out = data.slice(0, size);
    for (let h = 1; h < heads; h++) {
      const offset = h * size;
      for (let i = 0; i < size; i++) { const v = data[offset + i]; if (v > out[i]) out[i] = v; }
    }
    return out;
  }
  const sums = new Uint32Array(size);  // exact integer sums
  for (let h = 0; h < heads; h++) {
    const offset = h * size;
    for (let i = 0; i < size; i++) sums[i] += data[offset + i];
  }
  const out = new Uint8Array(size);
  for (let i = 0; i < size; i++) out[i] = Math.round(sums[i] / heads);
  return out;
}

/** A 3-D scatter on a 2-D canvas, rotated by dragging; onPick(index) on click. */
export function scatter3d(canvas, points, labels, colours, selected, onPick) {
  let yaw = 0.6, pitch = 0.3;
  const size = canvas.width;
  const extent = Math.max(1e-9, ...points.flat().map(Math.abs));
  let projected = [];
  function draw() {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, size, size);
    const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    projected = points.map(([x, y, z], i) => {
      const x1 = cy * x + sy * z, z1 = -sy * x + cy * z;
      const y1 = cp * y - sp * z1, z2 = sp * y + cp * z1;
      return { i, sx: size / 2 + (x1 / extent) * size * 0.42, sy: size / 2 - (y1 / extent) * size * 0.42, depth: z2 };
    }).sort((a, b) => a.depth - b.depth);
    for (const p of projected) {
      ctx.beginPath(); ctx.arc(p.sx, p.sy, p.i === selected ? 6 : 3.5, 0, 2 * Math.PI);
      ctx.fillStyle = colours[p.i]; ctx.fill();
      if (p.i === selected) { ctx.strokeStyle = "#000"; ctx.stroke(); }
    }
  }
  let drag = null;
  canvas.onpointerdown = (e) => { drag = { x: e.offsetX, y: e.offsetY, moved: false }; canvas.setPointerCapture(e.pointerId); };
  canvas.onpointermove = (e) => {
    if (!drag) return;
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
    yaw += dx * 0.01; pitch += dy * 0.01; drag.x = e.offsetX; drag.y = e.offsetY; draw();
  };
  canvas.onpointerup = (e) => {
    if (drag && !drag.moved) {
      const hit = projected.slice().reverse().find((p) => (p.sx - e.offsetX) ** 2 + (p.sy - e.offsetY) ** 2 < 49);
      if (hit) onPick(hit.i);
    }
    drag = null;
  };
  canvas.onmousemove = (e) => {
    const hit = projected.slice().reverse().find((p) => (p.sx - e.offsetX) ** 2 + (p.sy - e.offsetY) ** 2 < 49);
    canvas.title = hit ? `${hit.i}: ${labels[hit.i]}` : "";
  };
  draw();
  return { draw };
}

export { greenRed };
