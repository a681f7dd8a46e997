"""The gradient-flow figures: a record's profile (with the Jacobian bound and the per-step
parameter contributions) and the heatmap over training, drawn for the loggers by the monitor and
reused by the report."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rnnlab import gradflow  # noqa: E402
from rnnlab.records import Record  # noqa: E402

BOUND_DECADES = 6  # how far above the profile's peak the Jacobian bound is drawn


def profile_figure(record: Record, step: int, bound: bool = False) -> plt.Figure:
    """Left: ||dL/dz_t|| on a log scale (||dL/dc_t|| too for the LSTM; a line per layer and
    direction for a torch.nn module), with the profile the Lyapunov spectrum predicts when
    measured, and the bound the Jacobians give when measured and either ``bound`` is set or there
    is no prediction; right: the per-step parameter contributions ||dL/dW⁽ᵗ⁾||."""
    contributions = record.contributions
    fig, axes = plt.subplots(1, 2 if contributions else 1, figsize=(10 if contributions else 6,
                                                                    3.2), dpi=100, squeeze=False)
    ax = axes[0, 0]
    for key, values in record.profiles.items():
        name = key.replace("dL_d", "dL/d")
        if record.rows is None:
            semilogy_positive(ax, values, f"||{name}_t||")
        else:
            for row, row_values in zip(record.rows, values):
                semilogy_positive(ax, row_values, f"||{name}_t|| {row}")
    if record.lyapunov is not None and record.rows is None:
        semilogy_positive(ax, record.lyapunov.lyapunov_prediction,
                          "predicted by the Lyapunov spectrum: ||dL/dz_(T-1)|| · 10^(running λ1 "
                          f"· (T-1-t)), rate {record.lyapunov.predicted_decay_rate:.3g}/step", ":")
    elif record.lyapunov is not None:
        for row, values, rate in zip(record.rows, record.lyapunov.lyapunov_prediction,
                                     np.ravel(record.lyapunov.predicted_decay_rate)):
            semilogy_positive(ax, values, f"predicted by the Lyapunov spectrum {row}, rate "
                              f"{rate:.3g}/step", ":")
    if record.jacobians is not None and (bound or record.lyapunov is None):
        dL_dz = record.main_profile
        bound = gradflow.jacobian_bound(dL_dz, record.jacobians.jacobian_norm)
        # ||J_s|| ≈ 2 over 1000 steps puts the bound 300 decades up, past float64 and what a log
        # axis can tick: draw it while it stays within BOUND_DECADES of the profile's peak.
        with np.errstate(invalid="ignore"):
            top = np.nanmax(np.where(dL_dz > 0, dL_dz, np.nan), initial=0) * 10.0 ** BOUND_DECADES
        semilogy_positive(ax, np.where(bound <= top, bound, np.nan),
                          "||dL/dz_(T-1)|| · Π ||J_s||  (bound if L reads t = T-1 only; drawn "
                          f"up to 1e{BOUND_DECADES} × the profile's peak)", "--")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"training step {step}")
    for key, values in contributions.items():
        semilogy_positive(axes[0, 1], values, f"||dL/dW(t)|| {key.removeprefix('dL_dW_')}",
                          ".-")  # the decoder's is one point when only the last step is read
    if contributions:
        axes[0, 1].set_title("per-step parameter contributions")
    for ax in axes[0]:
        at_least_one_decade(ax)
        ax.set_xlabel("timestep t")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig


def lyapunov_figure(record: Record) -> plt.Figure:
    """The Lyapunov spectrum of the backward product: each measured sequence's exponents and
    their mean against the index i, with the measured decay rate for comparison (a torch.nn
    module's: one mean and one decay rate per layer and direction)."""
    section = record.lyapunov
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    means = np.atleast_2d(section.lyapunov)
    index = np.arange(1, means.shape[1] + 1)
    for exponents in np.reshape(section.lyapunov_per_sequence, (-1, means.shape[1])):
        ax.plot(index, exponents, "-", color="0.75", lw=0.8)
    rates = np.ravel(record.summary.decay_rate)
    for i, (row, mean) in enumerate(zip(record.rows or ("",), means)):
        name = f" {row}" if row else ""
        ax.plot(index, mean, "o-", color=f"C{i % 10}",
                label=f"mean over the measured sequences{name}")
        ax.axhline(float(rates[i]), color=f"C{i % 10}", ls="--",
                   label=f"measured decay rate of ||dL/dz_t||{name}")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("exponent i")
    ax.set_ylabel("λ_i (log10 per step)")
    ax.set_title(f"Lyapunov spectrum, training step {record.step}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig


def semilogy_positive(ax, values, label: str, style: str = "-", **kwargs) -> None:
    """Plot a profile on a log axis (zeros left out); call `at_least_one_decade` after the last."""
    values = np.asarray(values, dtype=np.float64)
    ax.semilogy(np.arange(len(values)), np.where(values > 0, values, np.nan), style, label=label,
                **kwargs)


def at_least_one_decade(ax) -> None:
    """Widen a log axis to a factor of 10 at least, so a flat profile (gain 1) looks flat rather
    than a zoom into rounding noise. Call it once every curve is drawn: it fixes the limits."""
    ax.relim()
    ax.autoscale_view()
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        middle = np.sqrt(low * high)
        ax.set_ylim(middle / np.sqrt(10), middle * np.sqrt(10))


def draw_heatmap(ax, steps, log10_rows: np.ndarray):
    """log10 ||dL/dz_t|| over (training step × t): row i spans halfway to its neighbouring
    records, so each row sits at its own training step however the records are spaced."""
    data = np.where(np.isfinite(log10_rows), log10_rows, np.nan)
    steps = np.asarray(steps, dtype=np.float64)
    half = np.diff(steps) / 2 if len(steps) > 1 else np.array([0.5])
    edges = np.concatenate([[steps[0] - half[0]], steps[:-1] + half, [steps[-1] + half[-1]]])
    image = ax.pcolormesh(np.arange(data.shape[1] + 1) - 0.5, edges, data, cmap="viridis",
                          shading="flat")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("training step")
    return image


def heatmap_figure(steps: list[int], rows: list[np.ndarray],
                   row_names: tuple[str, ...] | None = None) -> plt.Figure:
    """log10 ||dL/dz_t|| over (training step × t): ``rows`` holds each record's log10 profile,
    (T,), or (layers × directions, T) with ``row_names``: then one panel per layer and direction."""
    data = np.stack(rows)
    panels = [data] if row_names is None else [data[:, i] for i in range(data.shape[1])]
    names = [None] if row_names is None else list(row_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.2), dpi=100,
                             squeeze=False)
    for ax, panel, name in zip(axes[0], panels, names):
        fig.colorbar(draw_heatmap(ax, steps, panel), ax=ax, label="log10 ||dL/dz_t||")
        if name is not None:
            ax.set_title(name)
    fig.tight_layout()
    return fig
