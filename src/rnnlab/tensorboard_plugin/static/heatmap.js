// The heatmap: log10 of a profile over (training step × t), painted on a canvas from every record.
//
// Each record is a row at its training step (reaching halfway to its neighbours, as in the
// report's figure); past one timestep per pixel a pixel shows the largest value of its
// timesteps, so a spike is never averaged away. 0 (a gradient that underflowed) is black, NaN
// and ±inf magenta: colours the viridis scale never takes.

import {
  drawable, formatTick, formatValue, NONFINITE_COLOR, powerOfTen, VIRIDIS_LUT, ZERO_COLOR,
} from "./format.js";

const MARGIN = { left: 58, right: 10, top: 8, bottom: 30 };

// [min, max] of log10 of the positive finite values of a profile; null if it has none.
export function log10Extent(profile) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of profile.values) {
    for (const v of row) {
      if (drawable(v)) {
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
  }
  return lo <= hi ? [Math.log10(lo), Math.log10(hi)] : null;
}

// Colour limits: at least one decade, so that a flat profile reads as flat, not as noise.
export function colorLimits(extents) {
  const known = extents.filter((e) => e);
  if (!known.length) return [-1, 0];
  let lo = Math.min(...known.map((e) => e[0]));
  let hi = Math.max(...known.map((e) => e[1]));
  if (hi - lo < 1) {
    const middle = (lo + hi) / 2;
    lo = middle - 0.5;
    hi = middle + 0.5;
  }
  return [lo, hi];
}

// Round numbers from lo to hi, about `count` of them: 1, 2 or 5 × a power of ten apart.
export function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const every = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / every) * every; v <= hi + 1e-9 * every; v += every) {
    ticks.push(Math.round(v * 1e9) / 1e9);
  }
  return ticks;
}

function paint(rgba, offset, color) {
  rgba[offset] = color[0];
  rgba[offset + 1] = color[1];
  rgba[offset + 2] = color[2];
  rgba[offset + 3] = 255;
}

// The (records × columns) image of the profile: each column the max over its timesteps.
function image(profile, columns, lo, hi) {
  const { T, values } = profile;
  const pixels = new ImageData(columns, values.length);
  const rgba = pixels.data;
  const scale = 255 / (hi - lo);
  values.forEach((row, r) => {
    for (let c = 0; c < columns; c++) {
      const a = Math.floor((c * T) / columns);
      const e = Math.max(a + 1, Math.floor(((c + 1) * T) / columns));
      let top = -Infinity;
      let nonfinite = false;
      for (let t = a; t < e; t++) {
        const v = t < row.length ? row[t] : 0;
        if (!Number.isFinite(v)) nonfinite = true; // NaN, ±inf, or JSON's null
        else if (v > top) top = v;
      }
      const offset = 4 * (r * columns + c);
      if (nonfinite) paint(rgba, offset, NONFINITE_COLOR);
      else if (!(top > 0)) paint(rgba, offset, ZERO_COLOR);
      else {
        const i = Math.min(255, Math.max(0, Math.round((Math.log10(top) - lo) * scale)));
        paint(rgba, offset, VIRIDIS_LUT.subarray(3 * i, 3 * i + 3));
      }
    }
  });
  return pixels;
}

export class Heatmap {
  // `onPick(step)`: a click on a record's row.
  constructor(container, title, color, height, onPick) {
    this.tile = document.createElement("div");
    this.tile.className = "gf-heat";
    const heading = document.createElement("div");
    heading.className = "gf-heat-title";
    heading.innerHTML = `<span class="gf-swatch"></span><span></span>`;
    heading.firstChild.style.background = color;
    heading.lastChild.textContent = title;
    this.canvas = document.createElement("canvas");
    this.marker = document.createElement("div");
    this.marker.className = "gf-heat-marker";
    this.tip = document.createElement("div");
    this.tip.className = "gf-tip";
    const plot = document.createElement("div");
    plot.className = "gf-heat-plot";
    plot.append(this.canvas, this.marker, this.tip);
    this.tile.append(heading, plot);
    container.append(this.tile);
    this.height = height;
    this.rows = []; // [top, bottom) pixel rows of each record
    this.canvas.addEventListener("mousemove", (event) => this.hover(event));
    this.canvas.addEventListener("mouseleave", () => (this.tip.style.display = "none"));
    this.canvas.addEventListener("click", (event) => {
      const r = this.rowAt(event.offsetY);
      if (r >= 0) onPick(this.profile.steps[r]);
    });
  }

  draw(profile, lo, hi) {
    this.profile = profile;
    const width = Math.max(this.tile.clientWidth, 240);
    const ratio = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(this.height * ratio);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${this.height}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = this.height - MARGIN.top - MARGIN.bottom;
    this.plotW = plotW;
    const { steps, T } = profile;
    if (!steps.length) return;
    // Row edges halfway between records, in training steps; then in pixels, bottom to top.
    const half = steps.length > 1 ? steps.slice(1).map((s, i) => (s - steps[i]) / 2) : [0.5];
    const edges = [steps[0] - half[0], ...steps.slice(0, -1).map((s, i) => s + half[i]),
      steps[steps.length - 1] + half[half.length - 1]];
    const [first, last] = [edges[0], edges[edges.length - 1]];
    const y = (s) => MARGIN.top + Math.round(plotH * (1 - (s - first) / (last - first)));
    this.y = y;
    this.rows = steps.map((s, i) => [y(edges[i + 1]), y(edges[i])]);

    const columns = Math.min(T, Math.round(plotW * ratio));
    const off = document.createElement("canvas");
    off.width = columns;
    off.height = steps.length;
    off.getContext("2d").putImageData(image(profile, columns, lo, hi), 0, 0);
    ctx.imageSmoothingEnabled = false;
    this.rows.forEach(([top, bottom], r) => {
      ctx.drawImage(off, 0, r, columns, 1, MARGIN.left, top, plotW, Math.max(1, bottom - top));
    });

    ctx.fillStyle = "#555";
    ctx.strokeStyle = "#999";
    ctx.font = "11px Roboto, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of niceTicks(0, T - 1, Math.max(2, Math.floor(plotW / 80)))) {
      const x = MARGIN.left + ((t + 0.5) / T) * plotW;
      ctx.fillRect(x, MARGIN.top + plotH, 1, 4);
      ctx.fillText(String(t), x, MARGIN.top + plotH + 6);
    }
    ctx.fillText("timestep t", MARGIN.left + plotW / 2, this.height - 12);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const s of niceTicks(steps[0], steps[steps.length - 1], Math.max(2, plotH / 40))) {
      ctx.fillRect(MARGIN.left - 4, y(s), 4, 1);
      ctx.fillText(String(s), MARGIN.left - 6, y(s));
    }
    ctx.save();
    ctx.translate(12, MARGIN.top + plotH / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText("training step", 0, 0);
    ctx.restore();
    ctx.strokeRect(MARGIN.left - 0.5, MARGIN.top - 0.5, plotW + 1, plotH + 1);
  }

  // Mark the record drawn at slider step `step` (the latest at or before it).
  mark(step) {
    const steps = this.profile ? this.profile.steps : [];
    let r = -1;
    for (let i = 0; i < steps.length && steps[i] <= step; i++) r = i;
    if (r < 0) {
      this.marker.style.display = "none";
      return;
    }
    const [top, bottom] = this.rows[r];
    Object.assign(this.marker.style, {
      display: "block", left: `${MARGIN.left - 6}px`, width: `${this.plotW + 12}px`,
      top: `${top - 1}px`, height: `${Math.max(1, bottom - top)}px`,
    });
  }

  rowAt(py) {
    return this.rows.findIndex(([top, bottom]) => py >= top && py < Math.max(bottom, top + 1));
  }

  hover(event) {
    const r = this.rowAt(event.offsetY);
    const x = event.offsetX - MARGIN.left;
    if (r < 0 || x < 0 || x >= this.plotW) {
      this.tip.style.display = "none";
      return;
    }
    const { T, steps, values } = this.profile;
    const a = Math.floor((x / this.plotW) * T);
    const e = Math.max(a + 1, Math.floor(((x + 1) / this.plotW) * T));
    let t = a; // the largest value of the pixel's timesteps, as painted
    for (let k = a; k < e && k < values[r].length; k++) {
      if (!Number.isFinite(values[r][k])) { t = k; break; }
      if (values[r][k] > values[r][t]) t = k;
    }
    this.tip.textContent = `step ${steps[r]}, t ${t}: ${formatValue(values[r][t])}`;
    Object.assign(this.tip.style, { display: "block", left: `${event.offsetX + 12}px`,
      top: `${event.offsetY + 12}px` });
  }
}

// The colour bar of limits [lo, hi] (log10), with the two colours outside the scale.
export function drawColorbar(container, lo, hi, label) {
  container.innerHTML = "";
  const width = 320;
  const canvas = document.createElement("canvas");
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = 34 * ratio;
  canvas.style.width = `${width}px`;
  canvas.style.height = "34px";
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  for (let x = 0; x < width - 20; x++) {
    const i = Math.round((x / (width - 21)) * 255);
    ctx.fillStyle = `rgb(${VIRIDIS_LUT[3 * i]},${VIRIDIS_LUT[3 * i + 1]},${VIRIDIS_LUT[3 * i + 2]})`;
    ctx.fillRect(10 + x, 2, 1, 12);
  }
  ctx.fillStyle = "#555";
  ctx.font = "11px Roboto, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  // Powers of ten; within less than two decades, 1-2-5 steps between them.
  let ticks = niceTicks(Math.ceil(lo), Math.floor(hi), 6).filter((k) => Number.isInteger(k))
    .map((k) => [k, powerOfTen(k)]);
  if (ticks.length < 2) {
    ticks = [];
    for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) {
      for (const m of [1, 2, 5]) {
        const x = k + Math.log10(m);
        if (x >= lo && x <= hi) ticks.push([x, formatTick(m * 10 ** k)]);
      }
    }
  }
  for (const [k, text] of ticks) {
    const x = 10 + ((k - lo) / (hi - lo)) * (width - 21);
    ctx.fillRect(x, 14, 1, 4);
    ctx.fillText(text, x, 20);
  }
  const legend = document.createElement("div");
  legend.className = "gf-colorbar-legend";
  legend.innerHTML = `<span class="gf-colorbar-label"></span>
    <span><span class="gf-swatch" style="background: rgb(${ZERO_COLOR})"></span>0 (underflow)</span>
    <span><span class="gf-swatch" style="background: rgb(${NONFINITE_COLOR})"></span>NaN, ±inf</span>`;
  legend.firstElementChild.textContent = label;
  container.append(canvas, legend);
}
