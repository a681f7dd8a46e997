// The summaries over training: one small chart per summary key, every run overlaid, the slider's
// step marked; a prediction (predicted_decay_rate, jacobian_rate) dashed on its measurement's
// chart; a positive quantity spanning two decades or more (an exploding loss or gradient norm)
// on a log axis. Hovering shows every series' value at that step; the charts' cursors move together.

import { logAxis, logRange } from "./axes.js";
import uPlot from "./uplot-1.6.32/uPlot.esm.js";
import { formatTick, formatValue, SUMMARY_COMPANIONS, SUMMARY_ORDER, SUMMARY_TITLES } from "./format.js";

// chart key → [{run, key, values by step}] from run → {tag: {steps, values}}.
function chartsOf(runs, summaries) {
  const charts = new Map();
  for (const run of runs) {
    for (const [tag, series] of Object.entries(summaries.get(run.run) || {})) {
      const [prefix, key] = tag.includes("summary/") ? tag.split("summary/") : ["", tag];
      const [base, ...row] = key.split("/"); // a watched model's (R,) summary: one chart a row
      const companion = SUMMARY_COMPANIONS[base];
      const chart = prefix + [companion ? companion.chart : base, ...row].join("/");
      if (!charts.has(chart)) charts.set(chart, []);
      charts.get(chart).push({ run, key, companion, ...series });
    }
  }
  const rank = (chart) => {
    const i = SUMMARY_ORDER.indexOf(chart);
    return i < 0 ? SUMMARY_ORDER.length : i;
  };
  return [...charts.entries()].sort((a, b) => rank(a[0]) - rank(b[0]) || a[0].localeCompare(b[0]));
}

export class SummaryCharts {
  constructor(container) {
    this.container = container;
    this.plots = [];
    this.step = null;
  }

  // `runs`: [{run, label, color}] in legend order; `summaries`: run → {tag: {steps, values}}.
  draw(runs, summaries) {
    this.plots.forEach((p) => p.destroy());
    this.plots = [];
    this.container.innerHTML = "";
    for (const [chart, members] of chartsOf(runs, summaries)) {
      const steps = [...new Set(members.flatMap((m) => m.steps))].sort((a, b) => a - b);
      const at = new Map(steps.map((s, i) => [s, i]));
      const data = [steps, ...members.map((m) => {
        const ys = steps.map(() => null);
        m.steps.forEach((s, i) => (ys[at.get(s)] = m.values[i]));
        return ys;
      })];
      const tile = document.createElement("div");
      tile.className = "gf-summary";
      const title = document.createElement("div");
      title.className = "gf-summary-title";
      title.textContent = chartTitle(chart);
      const companions = [...new Set(members.filter((m) => m.companion)
        .map((m) => `${m.companion.dash[0] > 3 ? "dashed" : "dotted"}: ${m.companion.name}`))];
      if (companions.length) title.textContent += ` (solid: measured; ${companions.join("; ")})`;
      const tip = document.createElement("div");
      tip.className = "gf-tip";
      tile.append(title, tip);
      this.container.append(tile);
      const width = Math.max(260, tile.clientWidth);
      const self = this;
      const finite = data.slice(1).flat().filter((v) => Number.isFinite(v));
      const log = finite.length > 0 && finite.every((v) => v > 0)
        && Math.max(...finite) >= 100 * Math.min(...finite);
      const plot = new uPlot({
        width, height: 190,
        legend: { show: false },
        cursor: { sync: { key: "gf-summaries" }, points: { size: 5 } },
        scales: {
          x: { time: false },
          y: log ? { distr: 3, log: 10, range: (u, min, max) => logRange(min, max) } : {},
        },
        axes: [
          { stroke: "#555", grid: { stroke: "#eee" }, size: 34 },
          log ? logAxis() : { stroke: "#555", grid: { stroke: "#eee" }, size: 60,
            values: (u, splits) => splits.map((v) => formatTick(v)) },
        ],
        series: [{}, ...members.map((m) => ({
          label: m.companion ? `${m.run.label} (${m.companion.name})` : m.run.label,
          stroke: m.run.color, width: 1.5, dash: m.companion ? m.companion.dash : undefined,
          spanGaps: true, points: { show: steps.length < 40, size: 4 },
        }))],
        hooks: {
          draw: [(u) => self.drawMarker(u)],
          setCursor: [(u) => self.hover(u, tip, members)],
        },
      }, data, tile);
      this.plots.push(plot);
    }
    if (!this.plots.length) this.container.textContent = "No summaries recorded.";
  }

  // Mark training step `step` on every chart.
  mark(step) {
    this.step = step;
    this.plots.forEach((p) => p.redraw(false, false));
  }

  drawMarker(u) {
    if (this.step === null) return;
    const x = Math.round(u.valToPos(this.step, "x", true));
    const { top, height } = u.bbox;
    u.ctx.save();
    u.ctx.fillStyle = "rgba(245, 124, 0, 0.8)";
    u.ctx.fillRect(x, top, Math.max(1, window.devicePixelRatio || 1), height);
    u.ctx.restore();
  }

  hover(u, tip, members) {
    const i = u.cursor.idx;
    if (i == null || u.cursor.left < 0) {
      tip.style.display = "none";
      return;
    }
    const lines = members.map((m, k) => [m.run.color, u.series[k + 1].label, u.data[k + 1][i]])
      .filter(([, , v]) => v !== null && v !== undefined)
      .map(([color, label, v]) => `<div><span class="gf-swatch" style="background:${color}">`
        + `</span>${escapeHtml(label)}: ${formatValue(v)}</div>`);
    tip.innerHTML = `<div class="gf-tip-head">step ${u.data[0][i]}</div>${lines.join("")}`;
    const left = u.cursor.left + u.over.offsetLeft;
    Object.assign(tip.style, { display: "block", top: `${u.cursor.top + 30}px`,
      left: `${left + 14}px` });
  }
}

// `decay_rate` → its description; a watched model's `encoder.lstm/decay_rate/layer0` →
// "encoder.lstm · decay_rate · layer0" (the descriptions speak of z).
function chartTitle(chart) {
  return SUMMARY_TITLES[chart] || chart.split("/").join(" · ");
}

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
