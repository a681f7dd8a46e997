"""Exact per-timestep gradient norms of the recurrent state, and their lossless record.

``dL_dz[t] = ||∂L/∂z_t||_F`` over the (B, hidden) state, for the batch-mean loss L, where ∂/∂z_t is
the total derivative through every later step. Measured with zero probes (DESIGN.md §3): the model
adds p_t to each state, z_t ← z_t + p_t, so one backward pass leaves p_t.grad = ∂L/∂z_t.

Record: ``<run dir>/…/grad_flow/step_<global_step:07d>.npz``, one file per monitored step, with
``dL_dz`` (float64, (T,)), ``step``, ``T``, the loss and the parameter-gradient norm per module,
and the summary scalars of `summarize`. `load(run_dir)` stacks them into (steps, T) arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MODULES = ("encoder", "cell", "decoder")
HORIZON_THRESHOLD = 1e-3


def profile_key(state_name: str, index: int) -> str:
    """``dL_dz`` for the first state (what the decoder reads); ``dL_d<name>`` for the others."""
    return "dL_dz" if index == 0 else f"dL_d{state_name}"


def probe_profile(state_names: tuple[str, ...], probe_grads: tuple[Tensor, ...]) -> dict:
    """Norms per timestep from probe gradients, each (T, B, hidden) → (T,) float64."""
    return {
        profile_key(name, i): torch.linalg.vector_norm(g.double(), dim=tuple(range(1, g.dim())))
        .cpu().numpy()
        for i, (name, g) in enumerate(zip(state_names, probe_grads))
    }


def module_grad_norms(model: torch.nn.Module, grads: dict[str, Tensor] | None = None) -> dict:
    """``grad_norm_<module>``: the 2-norm of all parameter gradients of encoder, cell, decoder.

    Reads ``p.grad`` unless ``grads`` (parameter name → gradient) is given.
    """
    norms = {}
    for module in MODULES:
        parts = []
        for name, p in getattr(model, module).named_parameters(prefix=module):
            g = grads.get(name) if grads is not None else p.grad
            if g is not None:
                parts.append(torch.linalg.vector_norm(g.double()))
        norms[f"grad_norm_{module}"] = float(torch.linalg.vector_norm(torch.stack(parts))) \
            if parts else 0.0
    return norms


def summarize(dL_dz: np.ndarray) -> dict[str, float]:
    """Summary scalars of one profile (T,).

    - ``log10_first_last``: log10 ||dL/dz_0|| / ||dL/dz_{T−1}|| (< 0: vanishing, > 0: exploding).
    - ``decay_rate``: least-squares slope of log10 ||dL/dz_t|| against the number of steps back
      from the end, T−1−t; log10(gain) for the linear orthogonal RNN. < 0 vanishes, > 0 explodes.
    - ``horizon``: how many steps back from T−1 the norm stays within 10⁻³ of its maximum.
    Non-finite or zero norms are left out of the fit; the results are nan when nothing is left.
    """
    dL_dz = np.asarray(dL_dz, dtype=np.float64)
    T = dL_dz.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(dL_dz)
        first_last = float(log[0] - log[-1])
    ok = np.isfinite(log)
    back = (T - 1 - np.arange(T))[ok]
    decay = float(np.polyfit(back, log[ok], 1)[0]) if ok.sum() >= 2 else float("nan")
    finite = dL_dz[np.isfinite(dL_dz)]
    if finite.size == 0 or finite.max() <= 0:
        horizon = float("nan")
    else:
        below = np.nonzero(~(dL_dz >= HORIZON_THRESHOLD * finite.max()))[0]
        horizon = float(max(T - 2 - below.max(), 0)) if below.size else float(T - 1)
    return {"log10_first_last": first_last if np.isfinite(first_last) else float("nan"),
            "decay_rate": decay, "horizon": horizon}


def grad_flow(model, batch: dict[str, Tensor]) -> dict[str, np.ndarray | float]:
    """One batch's exact gradient flow, without touching ``.grad`` of the model's parameters.

    Returns ``dL_dz`` (T,) float64 (plus ``dL_d<s>`` for every further state, e.g. ``dL_dc`` for
    the LSTM), ``grad_norm_<module>`` for encoder, cell and decoder, ``loss``, and the
    `summarize` scalars.
    """
    x = batch["x"]
    probes = model.make_probes(x.shape[0], x.shape[1])
    loss = model.loss_fn(model(x, batch.get("dt"), probes), batch["y"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*probes, *(p for _, p in named)], allow_unused=True)
    record = probe_profile(model.cell.state_names, grads[: len(probes)])
    param_grads = {name: g for (name, _), g in zip(named, grads[len(probes):])}
    record.update(module_grad_norms(model, param_grads))
    record["loss"] = float(loss.detach())
    record.update(summarize(record["dL_dz"]))
    return record


def save(directory: str | Path, step: int, record: dict) -> Path:
    """Write one monitored step as ``step_<step:07d>.npz`` (float64 arrays, scalars as 0-d)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:07d}.npz"
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in record.items()}
    arrays["step"] = np.asarray(step, dtype=np.int64)
    arrays["T"] = np.asarray(len(record["dL_dz"]), dtype=np.int64)
    np.savez(path, **arrays)
    return path


def load(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Stack every ``grad_flow/step_*.npz`` under ``run_dir``, ordered by step.

    Returns arrays with a leading steps axis: ``dL_dz`` (steps, T), ``step`` (steps,), ….
    """
    files = sorted(Path(run_dir).glob("**/grad_flow/step_*.npz"))
    if not files:
        raise FileNotFoundError(
            f"no grad_flow/step_*.npz under {run_dir}: is it a run directory of "
            "scripts/train.py with the monitor on (monitor.every_n_steps)?")
    records = [dict(np.load(f)) for f in files]
    records.sort(key=lambda r: int(r["step"]))
    keys = set.intersection(*(set(r) for r in records))
    return {k: np.stack([r[k] for r in records]) for k in sorted(keys)}
