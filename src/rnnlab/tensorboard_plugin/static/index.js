// The "Gradient flow" tab: TensorBoard loads this module in the tab's frame and calls render().
//
// Left, the instrument and the runs; right, the profile of every selected run at the slider's
// training step, the heatmaps over (training step × t) and the summaries over training. The
// routes are relative to the frame's base (`data/plugin/gradflow/`); README, "The Gradient flow tab in TensorBoard".
//
// `window.gradflow` exposes the state, what the profile chart drew and `reload()`, for tests and
// the console.

import { Store } from "./data.js";
import { describeTag, runColors, sortRuns } from "./format.js";
import { colorLimits, drawColorbar, Heatmap, log10Extent } from "./heatmap.js";
import { ProfileChart } from "./profile_chart.js";
import { escapeHtml, SummaryCharts } from "./summary_charts.js";

const PLAY_INTERVAL_MS = 200;
const RELOAD_MS = 30000; // how often the tab looks for new records (of a run still training)
const SIDE_BY_SIDE = "";

const LAYOUT = `
<div class="gf">
  <aside class="gf-side">
    <section>
      <h3>Instrument</h3>
      <select id="gf-tag" aria-label="instrument"></select>
      <label class="gf-check" id="gf-prediction-box" hidden>
        <input type="checkbox" id="gf-prediction" checked> Lyapunov prediction (dashed)</label>
    </section>
    <section>
      <h3>Runs <span class="gf-links"><a href="#" id="gf-all">all</a> · <a href="#" id="gf-none">none</a></span></h3>
      <div id="gf-runs" class="gf-runs"></div>
    </section>
    <section>
      <h3>Heatmap</h3>
      <select id="gf-heatmap-mode" aria-label="heatmap"></select>
    </section>
    <p class="gf-note">Runs are named by the overrides that differ between them; hover a name
      for the run's directory. Drag across the profile to zoom in, double-click to zoom out;
      click a heatmap row to show that step.</p>
  </aside>
  <main class="gf-main">
    <div class="gf-stepbar">
      <button id="gf-play" title="play through the training steps">▶</button>
      <input type="range" id="gf-step" min="0" max="0" value="0" aria-label="training step">
      <span id="gf-step-label" class="gf-step-label"></span>
    </div>
    <div id="gf-message" class="gf-message" hidden></div>
    <section class="gf-card">
      <h2 id="gf-profile-title"></h2>
      <div id="gf-profile" class="gf-profile"></div>
      <p id="gf-profile-caption" class="gf-caption"></p>
    </section>
    <section class="gf-card">
      <h2 id="gf-heatmap-title"></h2>
      <div id="gf-colorbar" class="gf-colorbar"></div>
      <div id="gf-heatmaps" class="gf-heatmaps"></div>
    </section>
    <section class="gf-card">
      <h2>Summaries over training</h2>
      <div id="gf-summaries" class="gf-summaries"></div>
    </section>
  </main>
</div>`;

const store = new Store();
const state = {
  runs: [], // from /runs, each with its colour
  selected: new Set(),
  tag: null,
  steps: [], // the training steps of the slider: every selected run's steps of the tag
  index: 0, // the slider's position in steps
  heatmapRun: SIDE_BY_SIDE,
  prediction: true,
  timer: null,
};
const exposed = { state, drawn: null, draws: 0, firstDrawMs: null, errors: [], profile: null };
window.gradflow = exposed;
let profileChart = null;
let summaryCharts = null;
let heatmaps = [];
let drawToken = 0;
let viewToken = 0;

const $ = (id) => document.getElementById(id);

function fail(error) {
  console.error(error);
  exposed.errors.push(String(error));
  const box = $("gf-message");
  box.hidden = false;
  box.textContent = `Could not load the gradient-flow data: ${error.message || error}`;
}

// The selected runs that record the instrument (those the profile and heatmaps draw).
function selectedRuns() {
  return chosenRuns().filter((r) => r.tags[state.tag]);
}

function chosenRuns() {
  return state.runs.filter((r) => state.selected.has(r.run));
}

// The record shown at slider step `step` of a tag recorded at `steps`: the latest at or before.
function latestOf(steps, step) {
  let found = null;
  for (const s of steps) if (s <= step) found = s;
  return found;
}

// The Lyapunov prediction drawn with dL_dz: the tag beside it, where recorded.
function predictionTag(run) {
  if (!state.prediction || !state.tag.endsWith("dL_dz")) return null;
  const tag = state.tag.slice(0, -"dL_dz".length) + "lyapunov_prediction";
  return run.tags[tag] ? tag : null;
}

function currentStep() {
  return state.steps.length ? state.steps[state.index] : null;
}

// Draw the profile chart at the slider's step (records not yet loaded are fetched first).
async function drawProfile() {
  const token = ++drawToken;
  const step = currentStep();
  const runs = selectedRuns();
  const series = [];
  const reads = [];
  for (const run of runs) {
    const at = step === null ? null : latestOf(run.tags[state.tag].steps, step);
    const label = at === step ? run.label : `${run.label} (step ${at ?? "–"})`;
    series.push({ label, color: run.color, values: null });
    reads.push(at === null ? null : store.record(run.run, state.tag, at));
    const predicted = predictionTag(run);
    if (predicted) {
      const p = latestOf(run.tags[predicted].steps, step);
      series.push({ label: `${run.label} predicted`, color: run.color, dash: [6, 4], values: null });
      reads.push(p === null ? null : store.record(run.run, predicted, p));
    }
  }
  const values = await Promise.all(reads);
  if (token !== drawToken) return; // a later step was asked for meanwhile
  values.forEach((v, i) => (series[i].values = v));
  const T = Math.max(1, ...runs.map((r) => r.tags[state.tag].T));
  const title = describeTag(state.tag, runs[0] ? runs[0].tags[state.tag].row : null);
  $("gf-profile-title").textContent = `${title} against t at training step ${step ?? "–"}`;
  profileChart.draw(series, T, title);
  $("gf-profile-caption").textContent = profileChart.binned
    ? `T = ${T}: each pixel column draws the min and max of its timesteps; drag to zoom in.`
    : "";
  $("gf-step-label").textContent = step === null ? "no records"
    : `step ${step}  (record ${state.index + 1} of ${state.steps.length})`;
  requestAnimationFrame(() => { // painted
    if (exposed.firstDrawMs === null) exposed.firstDrawMs = performance.now();
    exposed.drawn = { step, tag: state.tag, runs: runs.map((r) => r.run), T };
    exposed.draws += 1;
  });
}

function markStep() {
  const step = currentStep();
  if (step === null) return;
  heatmaps.forEach((h) => h.mark(step));
  if (summaryCharts) summaryCharts.mark(step);
}

function setIndex(index) {
  state.index = Math.max(0, Math.min(index, state.steps.length - 1));
  $("gf-step").value = String(state.index);
  markStep();
  return drawProfile().catch(fail);
}

// Everything that depends on the runs and the tag: the slider, the chart's series, heatmaps.
async function refresh(toLatest = false) {
  const token = ++viewToken;
  const runs = selectedRuns();
  const before = currentStep();
  state.steps = [...new Set(runs.flatMap((r) => r.tags[state.tag].steps))].sort((a, b) => a - b);
  let index = state.steps.length - 1; // the latest step, or the one shown before
  if (before !== null && !toLatest) {
    const kept = state.steps.findIndex((s) => s >= before);
    if (kept >= 0) index = kept;
  }
  $("gf-step").max = String(Math.max(0, state.steps.length - 1));
  $("gf-prediction-box").hidden = !state.tag.endsWith("dL_dz")
    || !runs.some((r) => r.tags[state.tag.slice(0, -5) + "lyapunov_prediction"]);
  profileChart.destroy();
  profileChart.yRange = null;
  await setIndex(index);
  if (token !== viewToken) return;
  drawHeatmapsAndRange(runs, token).catch(fail);
  drawSummaries(chosenRuns(), token).catch(fail);
}

async function drawHeatmapsAndRange(runs, token) {
  const title = describeTag(state.tag, runs[0] ? runs[0].tags[state.tag].row : null);
  const one = runs.filter((r) => r.run === state.heatmapRun);
  const shown = one.length ? one : runs; // side by side, also when that run is not drawn
  const container = $("gf-heatmaps");
  container.className = `gf-heatmaps ${shown.length > 1 ? "gf-side-by-side" : ""}`;
  $("gf-heatmap-title").textContent = `log10 ${title} over training step × t`;
  const profiles = await Promise.all(runs.map((r) => store.profile(r.run, state.tag)));
  if (token !== viewToken) return;
  const extents = profiles.map(log10Extent);
  const known = extents.filter((e) => e);
  if (known.length) {
    profileChart.fixRange(10 ** Math.min(...known.map((e) => e[0])),
      10 ** Math.max(...known.map((e) => e[1])));
  }
  const [lo, hi] = colorLimits(shown.map((r) => extents[runs.indexOf(r)]));
  drawColorbar($("gf-colorbar"), lo, hi, `log10 ${title}`);
  container.innerHTML = "";
  const height = shown.length > 1 ? 220 : 360;
  heatmaps = shown.map((r) => {
    const map = new Heatmap(container, r.label, r.color, height, (step) => {
      const i = state.steps.indexOf(step);
      if (i >= 0) setIndex(i);
    });
    map.tile.title = r.run;
    return [map, profiles[runs.indexOf(r)]];
  }).map(([map, profile]) => {
    map.draw(profile, lo, hi);
    return map;
  });
  markStep();
}

async function drawSummaries(runs, token) {
  const all = await Promise.all(runs.map((r) => store.summaries(r.run)));
  if (token !== viewToken) return;
  summaryCharts.draw(runs, new Map(runs.map((r, i) => [r.run, all[i]])));
  markStep();
}

function fillControls() {
  const tags = new Map(); // every profile tag of any run, with its row
  for (const run of state.runs) {
    for (const [tag, info] of Object.entries(run.tags)) {
      if (info.kind === "profile" && !tag.endsWith("lyapunov_prediction")) tags.set(tag, info.row);
    }
  }
  for (const run of state.runs) { // a prediction without dL_dz beside it is its own instrument
    for (const [tag, info] of Object.entries(run.tags)) {
      if (tag.endsWith("lyapunov_prediction") && !run.tags[tag.slice(0, -19) + "dL_dz"]) {
        tags.set(tag, info.row);
      }
    }
  }
  const order = [...tags.keys()].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  $("gf-tag").innerHTML = order
    .map((t) => `<option value="${escapeHtml(t)}">${escapeHtml(describeTag(t, tags.get(t)))}</option>`)
    .join("");
  if (!order.includes(state.tag)) state.tag = order.includes("dL_dz") ? "dL_dz" : order[0];
  $("gf-tag").value = state.tag;

  $("gf-runs").innerHTML = "";
  for (const run of state.runs) {
    const row = document.createElement("label");
    row.className = "gf-run";
    row.title = run.run;
    row.innerHTML = `<input type="checkbox"><span class="gf-swatch"></span><span></span>`;
    row.firstChild.checked = state.selected.has(run.run);
    row.children[1].style.background = run.color;
    row.children[2].textContent = run.label;
    row.firstChild.addEventListener("change", (event) => {
      if (event.target.checked) state.selected.add(run.run);
      else state.selected.delete(run.run);
      refresh().catch(fail);
    });
    $("gf-runs").append(row);
  }
  const modes = [[SIDE_BY_SIDE, "every run, side by side"],
    ...state.runs.map((r) => [r.run, r.label])];
  $("gf-heatmap-mode").innerHTML = modes
    .map(([v, l]) => `<option value="${escapeHtml(v)}">${escapeHtml(l)}</option>`).join("");
}

// dL_dz first (a watched model's dL_dh), then the other states, contributions, Jacobians; a
// watched model's after the model's own.
function rank(tag) {
  const key = tag.split("/").filter((p) => p.startsWith("dL_d") || p.includes("_"))[0] || tag;
  const nested = tag.includes("/") ? 10 : 0;
  if (key === "dL_dz" || (nested && key === "dL_dh")) return nested;
  if (key.startsWith("dL_dW_")) return nested + 2;
  if (key.startsWith("dL_d")) return nested + 1;
  if (key === "jacobian_norm") return nested + 3;
  return nested + 4;
}

function setAll(checked) {
  state.selected = new Set(checked ? state.runs.map((r) => r.run) : []);
  document.querySelectorAll(".gf-run input").forEach((box) => (box.checked = checked));
  refresh().catch(fail);
}

function play() {
  if (state.timer) {
    clearInterval(state.timer);
    state.timer = null;
    $("gf-play").textContent = "▶";
    return;
  }
  if (state.index >= state.steps.length - 1) setIndex(0);
  $("gf-play").textContent = "❚❚";
  state.timer = setInterval(() => {
    if (state.index >= state.steps.length - 1) play();
    else setIndex(state.index + 1);
  }, PLAY_INTERVAL_MS);
}

function wire() {
  $("gf-step").addEventListener("input", (event) => setIndex(Number(event.target.value)));
  $("gf-play").addEventListener("click", play);
  $("gf-tag").addEventListener("change", (event) => {
    state.tag = event.target.value;
    refresh().catch(fail);
  });
  $("gf-prediction").addEventListener("change", (event) => {
    state.prediction = event.target.checked;
    profileChart.destroy();
    drawProfile().catch(fail);
  });
  $("gf-heatmap-mode").addEventListener("change", (event) => {
    state.heatmapRun = event.target.value;
    drawHeatmapsAndRange(selectedRuns(), viewToken).catch(fail);
  });
  $("gf-all").addEventListener("click", (e) => { e.preventDefault(); setAll(true); });
  $("gf-none").addEventListener("click", (e) => { e.preventDefault(); setAll(false); });
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      profileChart.resize();
      drawHeatmapsAndRange(selectedRuns(), viewToken).catch(fail);
      drawSummaries(chosenRuns(), viewToken).catch(fail);
    }, 200);
  });
}

// The runs as listed, with their colours; runs not seen before are selected.
function setRuns(runs) {
  const colors = runColors(runs);
  const known = new Set(state.runs.map((r) => r.run));
  state.runs = sortRuns(runs).map((r) => ({ ...r, color: colors.get(r.run) }));
  for (const run of runs) if (!known.has(run.run)) state.selected.add(run.run);
}

function hasProfiles() {
  return state.runs.some((r) => Object.values(r.tags).some((t) => t.kind === "profile"));
}

// New records (a run still training) or new runs: read again what changed, keep the view; the
// slider follows the latest step if it was there.
async function reload() {
  const runs = await store.runs();
  const before = new Map(state.runs.map((r) => [r.run, JSON.stringify(r.tags)]));
  const changed = runs.filter((r) => before.get(r.run) !== JSON.stringify(r.tags));
  if (!changed.length && runs.length === state.runs.length) return;
  changed.forEach((r) => store.forget(r.run));
  const atLatest = state.index === state.steps.length - 1;
  setRuns(runs);
  await show(atLatest);
}

// The view of the runs, or what is missing.
async function show(toLatest) {
  const message = $("gf-message");
  if (!hasProfiles()) {
    message.hidden = false;
    message.textContent = "No gradient-flow profiles in this logdir yet: rnnlab's monitor "
      + "writes them on its monitored steps (this tab looks again every 30 s).";
    return;
  }
  message.hidden = true;
  fillControls();
  await refresh(toLatest);
}

export async function render() {
  for (const sheet of ["uplot-1.6.32/uPlot.min.css", "style.css"]) {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = new URL(sheet, import.meta.url).href;
    document.head.append(link);
  }
  document.body.innerHTML = LAYOUT;
  profileChart = new ProfileChart($("gf-profile"));
  exposed.profile = profileChart;
  summaryCharts = new SummaryCharts($("gf-summaries"));
  wire();
  try {
    setRuns(await store.runs());
    await show(true);
  } catch (error) {
    fail(error);
  }
  exposed.reload = reload;
  setInterval(() => reload().catch(fail), RELOAD_MS);
}
