// Colour scales for the transcript and legends (values → CSS colours); display only, no metrics.
export const SAMPLED_NOT_TOP1 = "rgb(255, 224, 102)";

function mix(a, b, t) { return a.map((v, i) => Math.round(v + (b[i] - v) * t)); }
const GREEN = [120, 200, 120], YELLOW = [250, 230, 120], RED = [235, 110, 100];

/** t in [0, 1]: green (low) → yellow → red (high). */
export function greenRed(t) {
  const x = Math.min(1, Math.max(0, t));
  const c = x < 0.5 ? mix(GREEN, YELLOW, x * 2) : mix(YELLOW, RED, (x - 0.5) * 2);
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

/** t in [-1, 1]: blue (negative) → white → red (positive). */
export function diverging(t) {
  const x = Math.min(1, Math.max(-1, t));
  const c = x < 0 ? mix([255, 255, 255], [90, 130, 230], -x) : mix([255, 255, 255], [230, 90, 80], x);
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export function legend(element, mode, maximum) {
  element.replaceChildren();
  const label = (text) => { const s = document.createElement("span"); s.textContent = text; return s; };
  const bar = (css) => { const s = document.createElement("span"); s.className = "bar"; s.style.background = css; return s; };
  const ramp = "linear-gradient(to right, rgb(120,200,120), rgb(250,230,120), rgb(235,110,100))";
  const fmt = (v) => (v === undefined || v === null ? "" : Number(v).toFixed(2));
  switch (mode) {
    case "default": element.append(bar(SAMPLED_NOT_TOP1), label("sampled token was not the top-1")); break;
    case "entropy": element.append(label("0 nats"), bar(ramp), label(`${fmt(maximum)} nats`)); break;
    case "probability": element.append(label("p = 1"), bar(ramp), label("p = 0")); break;
    case "gap": element.append(label("gap p₁−p₂ = 1"), bar(ramp), label("0")); break;
    case "monitor": element.append(label("P(loop) 0"), bar(ramp), label("1")); break;
    case "delta": element.append(label(`Δp −${fmt(maximum)}`), bar("linear-gradient(to right, rgb(90,130,230), white, rgb(230,90,80))"), label(`+${fmt(maximum)}; red outline: token differs in run B`)); break;
    default: break;
  }
}
