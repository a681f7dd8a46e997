// Names, numbers and colours of the Gradient flow tab.

// Whether a profile value can sit on a log axis: not 0 (underflow), NaN, ±inf or null (JSON's
// non-finite).
export const drawable = (v) => v > 0 && v < Infinity;

// A tag's title: `encoder.lstm/dL_dh/layer0` → "encoder.lstm · ‖∂L/∂h_t‖ · layer0".
export function describeTag(tag, row) {
  const parts = tag.split("/");
  if (row != null) parts.pop();
  const key = parts.pop();
  const prefix = parts.join("/");
  let title = key;
  if (key === "dL_dz") title = "‖∂L/∂z_t‖";
  else if (key.startsWith("dL_dW_")) title = `‖∂L/∂W⁽ᵗ⁾‖ of the ${key.slice(6)}`;
  else if (key.startsWith("dL_d")) title = `‖∂L/∂${key.slice(4)}_t‖`;
  else if (key === "jacobian_norm") title = "‖∂z_t/∂z_t−1‖ (Jacobian norm)";
  else if (key === "lyapunov_prediction") title = "‖∂L/∂z_t‖ predicted (Lyapunov)";
  return [prefix, title, row].filter((p) => p).join(" · ");
}

// Summary keys drawn on another key's chart, and how: the prediction next to the measurement.
export const SUMMARY_COMPANIONS = {
  predicted_decay_rate: { chart: "decay_rate", dash: [6, 4], name: "predicted" },
  jacobian_rate: { chart: "decay_rate", dash: [2, 3], name: "allowed by the Jacobians" },
};
export const SUMMARY_ORDER = ["decay_rate", "log10_first_last", "horizon", "loss"];
export const SUMMARY_TITLES = {
  decay_rate: "decay rate: log10 ‖∂L/∂z_t‖ per step back",
  log10_first_last: "log10 ‖∂L/∂z_0‖ / ‖∂L/∂z_T−1‖",
  horizon: "horizon (steps within 10⁻³ of the peak)",
  loss: "loss of the monitored step",
};

const SUPERSCRIPT = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷",
  8: "⁸", 9: "⁹" };

export function powerOfTen(exponent) {
  return "10" + String(exponent).split("").map((c) => SUPERSCRIPT[c]).join("");
}

// A value for reading: 4 significant digits; NaN, ±inf (JSON null) and 0 (underflow) named.
export function formatValue(v) {
  if (v === null || v === undefined) return "non-finite";
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(3);
  return String(Number(v.toPrecision(4)));
}

// A label that names one number: `cell.gain=0.9`.
const SWEPT_NUMBER = /^([^\s=]+)=(-?[\d.]+(?:e[-+]?\d+)?)$/i;

// An axis tick: as short as it reads.
export function formatTick(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(1).replace(".0e", "e").replace("e+", "e");
  return String(Number(v.toPrecision(3)));
}

// Runs in legend order: a sweep over one number by the number, others by name (2 before 10).
export function sortRuns(runs) {
  const parsed = runs.map((r) => SWEPT_NUMBER.exec(r.label));
  const oneKey = parsed.every((m) => m && m[1] === parsed[0][1]);
  const value = new Map(runs.map((r, i) => [r.run, oneKey ? Number(parsed[i][2]) : 0]));
  return [...runs].sort((a, b) => value.get(a.run) - value.get(b.run)
    || a.run.localeCompare(b.run, undefined, { numeric: true }));
}

// Tableau 10: runs that differ in something other than one number.
const CATEGORICAL = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
// Dark blue to dark red (without a pale middle, so every line shows on white): a swept number.
const RAMP = [[49, 54, 149], [69, 117, 180], [116, 173, 209], [102, 189, 99], [253, 174, 97],
  [244, 109, 67], [165, 0, 38]];

function ramp(x) {
  const f = Math.min(Math.max(x, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(f), RAMP.length - 2);
  const w = f - i;
  const c = RAMP[i].map((a, k) => Math.round(a + w * (RAMP[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// run → colour. A sweep over one number (every label `key=<number>`, one key) is coloured by
// the number's rank along the ramp; otherwise categorical colours, or the ramp past ten runs.
export function runColors(runs) {
  const parsed = runs.map((r) => SWEPT_NUMBER.exec(r.label));
  const colors = new Map();
  const oneKey = parsed.every((m) => m && m[1] === parsed[0][1]);
  if (oneKey && runs.length > 1) {
    const order = runs.map((r, i) => [Number(parsed[i][2]), r.run]).sort((a, b) => a[0] - b[0]);
    order.forEach(([, run], i) => colors.set(run, ramp(i / (order.length - 1))));
  } else if (runs.length <= CATEGORICAL.length) {
    runs.forEach((r, i) => colors.set(r.run, CATEGORICAL[i]));
  } else {
    runs.forEach((r, i) => colors.set(r.run, ramp(i / (runs.length - 1))));
  }
  return colors;
}

// Viridis at 9 stops, interpolated: the heatmap's colour map (as the report's figures).
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

// 256 RGB triples, for painting a heatmap pixel by pixel.
export const VIRIDIS_LUT = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const f = (i / 255) * (VIRIDIS.length - 1);
    const k = Math.min(Math.floor(f), VIRIDIS.length - 2);
    const w = f - k;
    for (let c = 0; c < 3; c++) lut[3 * i + c] = VIRIDIS[k][c] + w * (VIRIDIS[k + 1][c] - VIRIDIS[k][c]);
  }
  return lut;
})();
export const ZERO_COLOR = [0, 0, 0]; // a gradient that underflowed to 0: below every colour
export const NONFINITE_COLOR = [255, 0, 255]; // NaN or ±inf: a colour viridis never takes
