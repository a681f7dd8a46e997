"""The gradient-flow figures: a record's profile (with the Jacobian bound and the per-step
parameter contributions) and the heatmap over training, drawn for TensorBoard by the monitor and
reused by the report."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rnnlab import gradflow  # noqa: E402

BOUND_DECADES = 6  # how far above the profile's peak the Jacobian bound is drawn


def profile_keys(record: dict) -> list[str]:
    """The state profiles in a record: ``dL_dz`` and ``dL_d<state>``, not ``dL_dW_<module>``."""
    return [k for k in record if k.startswith("dL_d") and not k.startswith("dL_dW_")]


def profile_figure(record: dict, step: int) -> plt.Figure:
    """Left: ||dL/dz_t|| on a log scale (and ||dL/dc_t|| for the LSTM), with the bound the
    Jacobians give when measured; right: the per-step parameter contributions ||dL/dW⁽ᵗ⁾||."""
    contributions = [k for k in record if k.startswith("dL_dW_")]
    fig, axes = plt.subplots(1, 2 if contributions else 1, figsize=(10 if contributions else 6,
                                                                    3.2), dpi=100, squeeze=False)
    ax = axes[0, 0]
    for key in profile_keys(record):
        semilogy_positive(ax, record[key], f"||{key.replace('dL_d', 'dL/d')}_t||")
    if "jacobian_norm" in record:
        bound = gradflow.jacobian_bound(record["dL_dz"], record["jacobian_norm"])
        # ||J_s|| ≈ 2 over 1000 steps puts the bound 300 decades up, past float64 and what a log
        # axis can tick: draw it while it stays within BOUND_DECADES of the profile's peak.
        with np.errstate(invalid="ignore"):
            top = np.nanmax(np.where(record["dL_dz"] > 0, record["dL_dz"], np.nan),
                            initial=0) * 10.0 ** BOUND_DECADES
        semilogy_positive(ax, np.where(bound <= top, bound, np.nan),
                          "||dL/dz_(T-1)|| · Π ||J_s||  (bound if L reads t = T-1 only; drawn "
                          f"up to 1e{BOUND_DECADES} × the profile's peak)", "--")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"training step {step}")
    for key in contributions:
        semilogy_positive(axes[0, 1], record[key], f"||dL/dW(t)|| {key.removeprefix('dL_dW_')}",
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


def heatmap_figure(steps: list[int], rows: list[np.ndarray]) -> plt.Figure:
    """log10 ||dL/dz_t|| over (training step × t)."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    fig.colorbar(draw_heatmap(ax, steps, np.stack(rows)), ax=ax, label="log10 ||dL/dz_t||")
    fig.tight_layout()
    return fig
