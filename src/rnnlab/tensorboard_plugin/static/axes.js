// Log axes for uPlot: whole decades, ticked as powers of ten.

import { powerOfTen } from "./format.js";

const MIN_EXPONENT = -323; // 10^-323 is float64's smallest (subnormal) power of ten

// [low, high] of a log axis: whole decades, at least one, around the positive values.
export function logRange(min, max) {
  if (!(min > 0) || !(max > 0)) return [0.1, 10];
  const lo = Math.max(Math.floor(Math.log10(min)), MIN_EXPONENT);
  let hi = Math.ceil(Math.log10(max));
  if (hi <= lo) hi = lo + 1;
  return [10 ** lo, 10 ** hi];
}

// Decades to tick, ~8 at most.
function decadeSplits(u, axisIdx, min, max) {
  const lo = Math.round(Math.log10(min));
  const hi = Math.round(Math.log10(max));
  const every = Math.max(1, Math.ceil((hi - lo) / 8));
  const splits = [];
  for (let k = Math.ceil(lo / every) * every; k <= hi; k += every) splits.push(10 ** k);
  return splits;
}

// The options of a log axis (its scale: {distr: 3, log: 10, range: logRange}).
export function logAxis() {
  return {
    stroke: "#555", size: 64, grid: { stroke: "#eee" },
    splits: decadeSplits,
    filter: (u, splits) => splits, // uPlot's log filter drops decades that are not 10x apart
    values: (u, splits) => splits.map((v) => powerOfTen(Math.round(Math.log10(v)))),
  };
}
