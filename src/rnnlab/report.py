"""The report: a self-contained figure set comparing finished runs.

``python scripts/report.py <run or sweep dir>... --out <dir>`` writes into ``<dir>``:

- ``profiles.png``: ||dL/dz_t|| against t at chosen training steps, one panel per run (log scale);
- ``profiles_by_step.png``: the same profiles the other way round, one panel per chosen training
  step with every run in it (the layout of the uRNN paper's gradient figure);
- ``heatmaps.png``: log10 ||dL/dz_t|| over (training step × t), one panel per run;
- ``decay_vs_gain.png``: the fitted decay rate per step against the configured ``cell.gain``, at
  the first and the last record, next to log10(gain) (the linear orthogonal RNN's exact rate);
- ``spectra.png``: the Lyapunov spectrum of the backward product (log10 per step) at the first and
  the last record that measured it, and the top exponent λ₁ against the training step, per run;
- ``loss.png``: the training loss at the monitored steps and the final validation loss, against
  the task's memoryless baseline;
- ``report.html``: one page embedding them (base64) with the table of final metrics, which is
  also printed to the console.

A run directory is any directory holding ``grad_flow/``; any other directory (a Hydra multirun,
``outputs/``) is searched for them. Records are read with `rnnlab.gradflow.load`, the final
metrics from ``metrics.json``, the configuration from ``.hydra/config.yaml``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rnnlab import gradflow  # noqa: E402
from rnnlab.config import short_override, unwritable_reason  # noqa: E402
from rnnlab.figures import at_least_one_decade, draw_heatmap, semilogy_positive  # noqa: E402
from rnnlab.rundir import GRAD_FLOW, RunDir, RunFileError, atomic_write  # noqa: E402

FIGURES = ("profiles", "profiles_by_step", "heatmaps", "decay_vs_gain", "spectra", "loss")
RECORD_COLUMNS = ("decay_rate", "predicted_decay_rate", "log10_first_last", "horizon",
                  "jacobian_rate")  # the last record's
COST_COLUMNS = {"s/step": "train/seconds_per_step", "peak MB": "train/peak_memory_mb",
                "NFE fwd": "cell/nfe_forward", "NFE bwd": "cell/nfe_backward"}  # metrics.json
COLUMNS = ("run", "overrides", "status", "cell", "gain", "T", "steps", "val/loss", "val/baseline",
           *RECORD_COLUMNS, *COST_COLUMNS)


class NoRunsError(FileNotFoundError):
    """A path given to the report holds no run directory."""


@dataclass
class Run:
    """One run directory: its stacked gradient-flow records, final metrics and configuration."""

    path: Path
    label: str
    record: dict[str, np.ndarray]
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    outcome: str = "incomplete"  # `RunDir.outcome`'s status
    failure: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The outcome, a failure with its error type (its records are up to the failure)."""
        if self.outcome == "failed":
            return f"failed ({self.failure.get('error_type', '?')})"
        return self.outcome

    @property
    def gain(self) -> float:
        gain = self.config.get("cell", {}).get("gain")
        return float(gain) if isinstance(gain, (int, float)) else math.nan

    @property
    def cell(self) -> str:
        cell = self.config.get("cell", {})
        name = str(cell.get("_target_", "?")).rsplit(".", 1)[-1]
        return f"{name}({cell['nonlinearity']})" if "nonlinearity" in cell else name

    def final(self) -> dict[str, float | str]:
        """The table row: final metrics and the last record's summary scalars."""
        row: dict[str, float | str] = {
            "run": self.label, "overrides": " ".join(self.overrides), "status": self.status,
            "cell": self.cell,
            "gain": self.gain, "T": int(self.record["T"][-1]),
            "steps": int(self.metrics.get("step") or self.record["step"][-1]),
            "val/loss": number(self.metrics.get("val/loss")),
            "val/baseline": number(self.metrics.get("val/baseline"))}
        for key in RECORD_COLUMNS:
            row[key] = float(self.record[key][-1]) if key in self.record else math.nan
        for column, key in COST_COLUMNS.items():
            row[column] = number(self.metrics.get(key))
        return row


def number(value) -> float:
    """A metric as a float; absent or null (metrics.json writes NaN as null) is NaN."""
    return math.nan if value is None else float(value)


def natural_key(path: Path) -> list:
    """Sort ``2`` before ``10`` (Hydra numbers multirun jobs)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every run directory (one holding ``grad_flow/``) at or below each path, in order: the
    runs under one path in natural order (2 before 10), the paths in the order given, except
    that paths given in a shell glob's order (sorted as text: 0, 10, 12, 2) are put in natural
    order too.

    Raises `NoRunsError` naming the path when one holds none.
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise NoRunsError(f"{path} is not a directory: give a run directory of "
                              "scripts/train.py, a multirun directory, or outputs/")
        found = sorted({p.parent for p in path.rglob(GRAD_FLOW) if p.is_dir()}, key=natural_key)
        if RunDir(path).is_run():
            found = [path]
        if not found:
            raise NoRunsError(f"no runs under {path}: a run directory holds grad_flow/, written "
                              "by scripts/train.py with the monitor on")
        runs += [run for run in found if run not in runs]
    given = [str(path) for path in paths]
    return sorted(runs, key=natural_key) if given == sorted(given) else runs


def load_run(path: Path, label: str) -> Run:
    """Read one run directory (its records must exist; metrics and config are optional).

    A file that exists but cannot be read is a `RunFileError` naming it."""
    run = RunDir(path)
    outcome = run.outcome()
    config = read_yaml(run.config) if run.config.is_file() else {}
    overrides = ([short_override(str(o)) for o in read_yaml(run.overrides)]
                 if run.overrides.is_file() else [])
    return Run(path, label, gradflow.load(path), outcome.metrics, config, overrides,
               outcome.label, outcome.failure)


def read_yaml(path: Path):
    """A run's Hydra file as plain containers, or `RunFileError` naming it."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise RunFileError(f"{path} cannot be read ({type(error).__name__}: {first}); it was "
                           "cut short or edited: restore it, or delete it (the report then "
                           "shows that run without its settings)") from None


def load_runs(paths: list[str | Path], console: Console | None = None) -> list[Run]:
    """`find_runs`, then `load_run` each; a run without records (a failed job) is skipped with a
    note. Labels are the paths relative to the runs' common parent; of the Hydra overrides, each
    run keeps those that differ between the runs."""
    found = find_runs(paths)
    absolute = [p.resolve() for p in found]
    common = Path(os.path.commonpath(absolute)) if len(found) > 1 else absolute[0].parent
    runs = []
    for path, resolved in zip(found, absolute):
        try:
            label = str(resolved.relative_to(common)) if resolved != common else path.name
            runs.append(load_run(path, label))
        except FileNotFoundError:
            if console is not None:
                console.print(f"[yellow]skipped {path}: grad_flow/ holds no records[/yellow]")
    if not runs:
        raise NoRunsError("no run with gradient-flow records under " + ", ".join(map(str, paths)))
    if len(runs) > 1:  # show what tells the runs apart, not what they share
        shared = set.intersection(*(set(run.overrides) for run in runs))
        for run in runs:
            run.overrides = [o for o in run.overrides if o not in shared]
    return runs


# --- figures ---------------------------------------------------------------------------------
def panels(n: int, width: float = 4.2, height: float = 3.0):
    columns = min(n, 3)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), dpi=100,
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def chosen_records(steps: np.ndarray, wanted: list[int] | None, count: int = 5) -> list[int]:
    """Indices of the records to draw: those nearest each ``wanted`` step, or ``count`` evenly
    spaced from the first to the last."""
    if wanted:
        return sorted({int(np.abs(steps - s).argmin()) for s in wanted})
    return sorted({int(round(i)) for i in np.linspace(0, len(steps) - 1, min(count, len(steps)))})


def title(run: Run) -> str:
    return run.label + (f"\n{' '.join(run.overrides)}" if run.overrides else "")


def legend_names(runs: list[Run]) -> list[str]:
    """Each run's name in a legend: the overrides that tell it apart (``cell=gru``), or its
    label and overrides where two runs would share a name (or it has no overrides)."""
    short = [" ".join(run.overrides) for run in runs]
    unique = all(short) and len(set(short)) == len(short)
    return short if unique else [" ".join([run.label, *run.overrides]) for run in runs]


def profiles_figure(runs: list[Run], steps: list[int] | None = None) -> plt.Figure:
    fig, axes = panels(len(runs))
    for ax, run in zip(axes, runs):
        dL_dz, record_steps = run.record["dL_dz"], run.record["step"]
        chosen = chosen_records(record_steps, steps)
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(chosen)))
        for color, i in zip(colors, chosen):
            semilogy_positive(ax, dL_dz[i], f"step {int(record_steps[i])}", color=color)
        finish_profile_axes(ax, title(run), fontsize=8)
    fig.tight_layout()
    return fig


def finish_profile_axes(ax: plt.Axes, title_text: str, fontsize: int) -> None:
    """Limits, title, labels, grid and legend of a panel of ||dL/dz_t|| curves."""
    at_least_one_decade(ax)
    ax.set_title(title_text, fontsize=fontsize)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("||dL/dz_t||")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def profiles_by_step_figure(runs: list[Run], steps: list[int] | None = None) -> plt.Figure:
    """One panel per training step (default: the first and the last record), one curve per run:
    ||dL/dz_t|| against t on a log scale, each run's record nearest that step."""
    if not steps:
        first = runs[0].record["step"]
        steps = sorted({int(first[0]), int(first[-1])})
    fig, axes = panels(len(steps))
    colors = plt.cm.tab10(np.arange(len(runs)) % 10)
    names = legend_names(runs)
    for ax, step in zip(axes, steps):
        for color, run, name in zip(colors, runs, names):
            i = int(np.abs(run.record["step"] - step).argmin())
            semilogy_positive(ax, run.record["dL_dz"][i], name, color=color)
        finish_profile_axes(ax, f"training step {step}", fontsize=9)
    fig.tight_layout()
    return fig


def heatmaps_figure(runs: list[Run]) -> plt.Figure:
    fig, axes = panels(len(runs))
    for ax, run in zip(axes, runs):
        with np.errstate(divide="ignore"):
            data = np.log10(run.record["dL_dz"])
        image = draw_heatmap(ax, run.record["step"], data)
        fig.colorbar(image, ax=ax, label="log10 ||dL/dz_t||")
        ax.set_title(title(run), fontsize=8)
    fig.tight_layout()
    return fig


def decay_vs_gain_figure(runs: list[Run]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    with_gain = [r for r in runs if np.isfinite(r.gain) and r.gain > 0]
    for cell in sorted({r.cell for r in with_gain}):
        group = sorted((r for r in with_gain if r.cell == cell), key=lambda r: r.gain)
        gains = [r.gain for r in group]
        ax.plot(gains, [r.record["decay_rate"][0] for r in group], "o--",
                label=f"{cell}, step {int(group[0].record['step'][0])}")
        ax.plot(gains, [r.record["decay_rate"][-1] for r in group], "s-",
                label=f"{cell}, last record")
        if any("predicted_decay_rate" in r.record for r in group):
            ax.plot(gains, [r.record["predicted_decay_rate"][-1] if "predicted_decay_rate"
                            in r.record else math.nan for r in group], "x:", ms=9,
                    label=f"{cell}, last record: predicted by the Lyapunov spectrum")
    if with_gain:
        grid = np.geomspace(min(r.gain for r in with_gain), max(r.gain for r in with_gain), 50)
        ax.plot(grid, np.log10(grid), "k:", label="log10(gain): linear orthogonal RNN")
        ax.set_xscale("log")  # log10(gain) is then a straight line
        ax.set_xticks(sorted({r.gain for r in with_gain}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run sets cell.gain", ha="center", va="center",
                transform=ax.transAxes)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("cell.gain")
    ax.set_ylabel("decay rate (log10 ||dL/dz|| per step back)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def spectra_figure(runs: list[Run]) -> plt.Figure:
    """Left: each run's spectrum λ_1 … λ_k at its first (dashed, ``gid`` "first") and last
    (solid, ``gid`` "last") record with one; right: λ₁ against the training step, with the one
    legend of both panels (a run has the same colour in each). Records without a spectrum are
    left out."""
    fig, (spectra, top) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    measured = [r for r in runs if "lyapunov" in r.record]
    for i, (run, name) in enumerate(zip(measured, legend_names(measured))):
        color, exponents = f"C{i % 10}", run.record["lyapunov"]  # (records, k), NaN: none
        rows = np.flatnonzero(np.isfinite(exponents[:, 0]))
        if not len(rows):
            continue
        index = np.arange(1, exponents.shape[1] + 1)
        spectra.plot(index, exponents[rows[0]], "o--", color=color, ms=3, lw=0.8, gid="first")
        spectra.plot(index, exponents[rows[-1]], "o-", color=color, ms=3, gid="last")
        top.plot(run.record["step"][rows], exponents[rows, 0], ".-", color=color, label=name)
    if not measured:
        spectra.text(0.5, 0.5, "no Lyapunov spectrum recorded (monitor.lyapunov_every_n_steps)",
                     ha="center", va="center", transform=spectra.transAxes, fontsize=8)
    for ax in (spectra, top):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.grid(True, alpha=0.3)
    if measured:
        top.legend(fontsize=7)
    spectra.set_xlabel("exponent i")
    spectra.set_ylabel("λ_i (log10 per step)")
    spectra.set_title("Lyapunov spectrum: first (dashed) and last (solid) record with one\n"
                      "(colours as on the right)", fontsize=9)
    top.set_xlabel("training step")
    top.set_ylabel("λ₁ (log10 per step)")
    top.set_title("top exponent: < 0 vanishing, > 0 exploding", fontsize=9)
    fig.tight_layout()
    return fig


def loss_figure(runs: list[Run]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (run, name) in enumerate(zip(runs, legend_names(runs))):
        color = f"C{i % 10}"
        ax.plot(run.record["step"], run.record["loss"], ".-", color=color, label=name)
        if run.metrics.get("val/loss") is not None:
            ax.plot([run.metrics.get("step", run.record["step"][-1])], [run.metrics["val/loss"]],
                    "*", color=color, ms=10)
        if run.metrics.get("val/baseline") is not None:
            ax.axhline(run.metrics["val/baseline"], color=color, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (lines), final val/loss (*), memoryless baseline (dashed)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- table and page --------------------------------------------------------------------------
def format_value(value) -> str:
    if isinstance(value, float):
        return "—" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def metrics_table(runs: list[Run]) -> Table:
    table = Table(title="final metrics (grad-flow columns: the last record)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("run", "overrides", "status", "cell")
                         else "right")
    for run in runs:
        row = run.final()
        table.add_row(*(format_value(row[c]) for c in COLUMNS))
    return table


def html_page(runs: list[Run], images: dict[str, bytes]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(run.final()[c]))}</td>" for c in COLUMNS)
        + "</tr>" for run in runs)
    figures = "".join(
        f'<h2>{name.replace("_", " ")}</h2><img alt="{name}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in images.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>rnnlab report</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:90%}}
</style></head><body>
<h1>rnnlab report: {len(runs)} run{"s" if len(runs) != 1 else ""}</h1>
<h2>final metrics</h2><table><tr>{head}</tr>{rows}</table>
{figures}
</body></html>
"""


def figure_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(paths: list[str | Path], out: str | Path, steps: list[int] | None = None,
                 console: Console | None = None) -> Path:
    """Load the runs under ``paths``, write the PNGs and ``report.html`` into ``out``, print the
    table; return the page's path. Raises `NoRunsError` when a path holds no run, and
    `RunFileError` naming the file when a run's file cannot be read or ``out`` written."""
    console = console or Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console.width = max(console.width, 240)
    out = Path(out)
    reason = unwritable_reason(out)
    if reason is not None:
        raise RunFileError(f"--out {out}: cannot write there ({reason}); choose another --out")
    runs = load_runs(paths, console)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"profiles": profiles_figure(runs, steps),
               "profiles_by_step": profiles_by_step_figure(runs, steps),
               "heatmaps": heatmaps_figure(runs),
               "decay_vs_gain": decay_vs_gain_figure(runs), "spectra": spectra_figure(runs),
               "loss": loss_figure(runs)}
    images = {name: figure_png(fig) for name, fig in figures.items()}
    page = out / "report.html"
    files = {out / f"{name}.png": png for name, png in images.items()}
    files[page] = html_page(runs, images).encode()
    for path, content in files.items():
        try:
            atomic_write(path, lambda f, content=content: f.write(content))
        except OSError as error:
            raise RunFileError(f"--out {out}: cannot write {path} ({error})") from None
    console.print(metrics_table(runs))
    return page
