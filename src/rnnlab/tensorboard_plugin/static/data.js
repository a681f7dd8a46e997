// The tab's reads of the plugin's routes, each made once and kept.
//
// A profile is read whole (every record of a run's tag) for the slider and the heatmap, as raw
// float64 (`format=float64`: nothing to format or parse, NaN and ±inf kept); until it has
// arrived, the chart draws the one record it shows from `/profile?...&step=` (JSON, null for a
// non-finite value), which answers in milliseconds where a sweep's whole profiles take longer.

export class Store {
  constructor() {
    this.profiles = new Map(); // run/tag → Promise of {steps, T, values}
    this.loaded = new Map(); // run/tag → {steps, T, values}, once arrived
    this.records = new Map(); // run/tag/step → Promise of one record's values
    this.summaryReads = new Map(); // run → Promise of {tags}
  }

  async get(route, params = {}) {
    const query = new URLSearchParams(params).toString();
    const response = await fetch(query ? `${route}?${query}` : route);
    if (!response.ok) {
      throw new Error(`${route} ${query}: ${response.status} ${await response.text()}`);
    }
    return response.json();
  }

  runs() {
    return this.get("runs").then((body) => body.runs);
  }

  // Every record of `tag` in `run`: {steps, T, values: a Float64Array of T per step}.
  profile(run, tag) {
    const key = `${run}\u0000${tag}`;
    if (!this.profiles.has(key)) {
      this.profiles.set(key, this.float64(run, tag).then((body) => {
        this.loaded.set(key, body);
        return body;
      }));
    }
    return this.profiles.get(key);
  }

  async float64(run, tag) {
    const query = new URLSearchParams({ run, tag, format: "float64" }).toString();
    const response = await fetch(`profile?${query}`);
    if (!response.ok) throw new Error(`profile ${query}: ${response.status} ${await response.text()}`);
    const header = response.headers.get("X-Gradflow-Steps");
    const steps = header ? header.split(",").map(Number) : [];
    const T = Number(response.headers.get("X-Gradflow-T"));
    const all = new Float64Array(await response.arrayBuffer()); // little-endian, as every browser
    return { steps, T, values: steps.map((s, i) => all.subarray(i * T, (i + 1) * T)) };
  }

  // The values of `tag` in `run` at `step`, from the whole profile when it is here.
  async record(run, tag, step) {
    const whole = this.loaded.get(`${run}\u0000${tag}`);
    if (whole) return whole.values[whole.steps.indexOf(step)];
    const key = `${run}\u0000${tag}\u0000${step}`;
    if (!this.records.has(key)) {
      this.records.set(key, this.get("profile", { run, tag, step }).then((b) => b.values[0]));
    }
    return this.records.get(key);
  }

  // Read `run` again next time: it has new records.
  forget(run) {
    for (const cache of [this.profiles, this.loaded]) {
      for (const key of cache.keys()) if (key.startsWith(`${run}\u0000`)) cache.delete(key);
    }
    this.summaryReads.delete(run);
  }

  summaries(run) {
    if (!this.summaryReads.has(run)) {
      this.summaryReads.set(run, this.get("summaries", { run }).then((body) => body.tags));
    }
    return this.summaryReads.get(run);
  }
}
