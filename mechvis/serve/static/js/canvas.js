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
  const pixels = image.data;
  const lut = new Uint8Array(256);
  for (let i = 0; i < 256; i++) lut[i] = log ? (i === 0 ? 0 : Math.round(255 * (Math.log(i) / Math.log(255)) ** 1)) : i;
  let scale = 1;
  if (hide.length) {  // renormalise the colour range without the hidden columns
    let maximum = 1;
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) if (!hide.includes(k) && matrix[q * n + k] > maximum) maximum = matrix[q * n + k];
    scale = 255 / maximum;
  }
  for (let i = 0; i < n * n; i++) {
    const k = i % n;
    const v = hide.length && hide.includes(k) ? 0 : lut[Math.min(255, Math.round(matrix[i] * scale))];
    pixels[i * 4] = PALETTE[v * 3]; pixels[i * 4 + 1] = PALETTE[v * 3 + 1]; pixels[i * 4 + 2] = PALETTE[v * 3 + 2]; pixels[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  if (row !== null && row < n) {
    ctx.strokeStyle = "rgba(230, 40, 40, 0.9)"; ctx.lineWidth = Math.max(1, n / 200);
    ctx.strokeRect(0, row, n, 1);
  }
}

/** Head-combined matrix (mean or max) of [heads, n, n] uint8 data. */
export function combineHeads(data, heads, n, how) {
  const out = new Uint8Array(n * n);
  if (typeof how === "number") return data.subarray(how * n * n, (how + 1) * n * n);
  const sums = new Float32Array(n * n);
  for (let h = 0; h < heads; h++) {
    const offset = h * n * n;
    for (let i = 0; i < n * n; i++) sums[i] = how === "max" ? Math.max(sums[i], data[offset + i]) : sums[i] + data[offset + i] / heads;
  }
  for (let i = 0; i < n * n; i++) out[i] = Math.round(sums[i]);
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
