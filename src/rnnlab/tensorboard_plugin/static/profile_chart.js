// The profile chart: one run's record per line against t, on a log axis (uPlot).
//
// Drawn from the full record; past two points per pixel (T = 10,000 on a 900-pixel chart) each
// pixel column draws the min and max of its timesteps, and zooming in (drag across the chart;
// double-click to zoom out) draws the timesteps of the new window again, down to every point.

import uPlot from "./uplot-1.6.32/uPlot.esm.js";
import { logAxis, logRange } from "./axes.js";
import { drawable, formatValue } from "./format.js";

const positive = (v) => (drawable(v) ? v : null); // a gap where the log axis has no place

// [xs, ...ys] of the rows over t in [lo, hi]; `binned` when pixel columns hold min and max.
function columns(rows, T, lo, hi, width) {
  const n = hi - lo + 1;
  const xs = [];
  const ys = rows.map(() => []);
  const binned = n > 2 * width;
  if (!binned) {
    for (let t = lo; t <= hi; t++) xs.push(t);
    rows.forEach((row, i) => {
      for (let t = lo; t <= hi; t++) ys[i].push(row && t < row.length ? positive(row[t]) : null);
    });
  } else {
    for (let b = 0; b < width; b++) {
      const a = lo + Math.floor((b * n) / width);
      const e = lo + Math.floor(((b + 1) * n) / width);
      xs.push(a, (a + e - 1) / 2);
      rows.forEach((row, i) => {
        let top = null;
        let bottom = null;
        for (let t = a; row && t < e && t < row.length; t++) {
          const v = row[t];
          if (drawable(v)) {
            if (top === null || v > top) top = v;
            if (bottom === null || v < bottom) bottom = v;
          }
        }
        ys[i].push(top, bottom);
      });
    }
  }
  // The whole range stays in the data, so that a double-click zooms back out to it.
  if (lo > 0) {
    xs.unshift(0);
    ys.forEach((y) => y.unshift(null));
  }
  if (hi < T - 1) {
    xs.push(T - 1);
    ys.forEach((y) => y.push(null));
  }
  return { data: [xs, ...ys], binned };
}

export class ProfileChart {
  // `container`: the element the chart fills; `yLabel`: the axis label.
  constructor(container) {
    this.container = container;
    this.plot = null;
    this.key = null; // what the series are: rebuilt when it changes
    this.rows = [];
    this.T = 0;
    this.window = null; // [lo, hi] timesteps shown
    this.yRange = null; // every record's, once known: playing keeps the axis (unless zoomed in)
    this.binned = false;
  }

  // `series`: [{label, color, dash, values: (T,) array with null and 0, or null}].
  draw(series, T, yLabel) {
    const key = JSON.stringify([series.map((s) => [s.label, s.color, s.dash]), T, yLabel]);
    this.rows = series.map((s) => s.values);
    if (key !== this.key || !this.plot) {
      this.key = key;
      this.T = T;
      this.window = [0, T - 1];
      this.build(series, yLabel);
      return;
    }
    const { data, binned } = columns(this.rows, this.T, ...this.window, this.width());
    this.binned = binned;
    if (!this.yRange) {
      this.plot.setData(data);
      return;
    }
    this.plot.setData(data, false); // keeps the zoom
    if (this.zoomedIn()) { // the y axis fits the window's values
      this.plot.setScale("x", { min: this.plot.scales.x.min, max: this.plot.scales.x.max });
    } else {
      this.plot.redraw();
    }
  }

  zoomedIn() {
    return this.window[0] > 0 || this.window[1] < this.T - 1;
  }

  // Fix the y axis to [min, max] of the positive values of every record.
  fixRange(min, max) {
    this.yRange = min > 0 ? logRange(min, max) : null;
    if (this.plot && this.yRange) this.plot.setScale("y", { min: this.yRange[0], max: this.yRange[1] });
  }

  width() {
    return Math.max(this.container.clientWidth, 300);
  }

  build(series, yLabel) {
    if (this.plot) this.plot.destroy();
    const { data, binned } = columns(this.rows, this.T, ...this.window, this.width());
    this.binned = binned;
    const chart = this;
    const opts = {
      width: this.width(),
      height: 340,
      scales: {
        x: { time: false },
        y: {
          distr: 3, log: 10,
          range: (u, min, max) => (chart.yRange && !chart.zoomedIn() ? chart.yRange
            : logRange(min, max)),
        },
      },
      axes: [
        { label: "timestep t", stroke: "#555", grid: { stroke: "#eee" } },
        { label: yLabel, ...logAxis() },
      ],
      series: [
        {
          label: "t",
          value: (u, v, si, di) => {
            if (v == null) return "–";
            if (!chart.binned) return String(v);
            const x = u.data[0];
            const a = di % 2 === 0 ? x[di] : Math.ceil(x[di - 1]);
            const e = di % 2 === 0 ? (di + 2 < x.length ? x[di + 2] : chart.T) : x[di + 1];
            return `${a}…${Math.max(a, Math.round(e) - 1)}`;
          },
        },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 1.6,
          dash: s.dash,
          points: { show: false },
          spanGaps: false,
          value: (u, v, si, di) => {
            if (chart.binned) return v == null ? "–" : formatValue(v);
            const row = chart.rows[si - 1];
            const t = u.data[0][di];
            return row && t < row.length ? formatValue(row[t]) : "–";
          },
        })),
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false }, points: { size: 6 } },
      hooks: { setScale: [(u, scale) => scale === "x" && chart.zoomed(u)] },
    };
    this.plot = new uPlot(opts, data, this.container);
  }

  // After a zoom: draw the timesteps of the new window again (binned charts only).
  zoomed(u) {
    const lo = Math.max(0, Math.floor(u.scales.x.min));
    const hi = Math.min(this.T - 1, Math.ceil(u.scales.x.max));
    if (lo === this.window[0] && hi === this.window[1]) return;
    const wasBinned = this.binned;
    this.window = [lo, hi];
    if (!wasBinned && this.T <= 2 * this.width()) return;
    const { data, binned } = columns(this.rows, this.T, lo, hi, this.width());
    this.binned = binned;
    const { min, max } = u.scales.x;
    queueMicrotask(() => {
      u.setData(data, false);
      u.setScale("x", { min, max });
    });
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: 340 });
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.key = null;
  }
}
