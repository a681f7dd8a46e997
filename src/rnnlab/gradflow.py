"""Exact per-timestep gradient norms of the recurrent state, and their lossless record.

``dL_dz[t] = ||∂L/∂z_t||_F`` over the (B, hidden) state, for the batch-mean loss L, where ∂/∂z_t is
the total derivative through every later step. Measured with zero probes (DESIGN.md §3): the model
adds p_t to each state, z_t ← z_t + p_t, so one backward pass leaves p_t.grad = ∂L/∂z_t.

Two instruments explain the profile:

- per-step parameter contributions ``dL_dW_<module>[t] = ||dL/dW⁽ᵗ⁾||``: the parameters are
  shared in time, so dL/dW = Σ_t dL/dW⁽ᵗ⁾; measured with zero parameter probes (`RecurrentModel.
  make_param_probes`), one backward pass for all t;
- transition Jacobians ``jacobian_norm[t] = ||∂z_t/∂z_{t−1}||₂`` by power iteration: since
  ∂L/∂z_{t−1} = J_tᵀ ∂L/∂z_t wherever the loss is not read at t−1, the product of these norms
  bounds the decay or growth of the profile — the cause next to the effect.

Record: ``<run dir>/…/grad_flow/step_<global_step:07d>.npz``, one file per monitored step, with
``dL_dz`` (float64, (T,)), ``step``, ``T``, the loss and the parameter-gradient norm per module,
the summary scalars of `summarize`, and the instruments above when they ran on that step.
`load(run_dir)` stacks them into (steps, T) arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rnnlab.cells.base import Cell, State, state_key, state_keys
from rnnlab.model import MODULES

HORIZON_THRESHOLD = 1e-3
# Sums a tensor over the processes of a data-parallel run (None: a single process).
Reduce = Callable[[Tensor], Tensor] | None
# Rows (timestep × sequence) per batch of the Jacobian power iteration: bounds its memory.
JACOBIAN_ROWS = 16384
JACOBIAN_SEED = 0  # the power iteration starts from the same vector on every call


def profile_key(state_name: str, index: int) -> str:
    """The record key of state ``index`` named ``state_name``: `rnnlab.cells.base.state_keys`."""
    return state_key(state_name, index)


def probe_profile(state_names: tuple[str, ...], probe_grads: tuple[Tensor, ...],
                  sum_over_processes: Reduce = None, world_size: int = 1) -> dict:
    """Norms per timestep from probe gradients, each (T, B, hidden) → (T,) float64.

    Under data parallelism each of the R processes holds ∂L_r/∂z_t for its share of the batch,
    and the global batch-mean loss is L = (1/R) Σ_r L_r; so ||∂L/∂z_t|| over the global batch is
    √(Σ_r ||∂L_r/∂z_t||²) / R: squared norms are summed with ``sum_over_processes``.
    """
    record = {}
    for key, g in zip(state_keys(state_names), probe_grads):
        squares = g.double().square().sum(dim=tuple(range(1, g.dim())))
        if sum_over_processes is not None:
            squares = sum_over_processes(squares)
        record[key] = (squares.sqrt() / world_size).cpu().numpy()
    return record


def module_grad_norms(model: torch.nn.Module, grads: dict[str, Tensor] | None = None) -> dict:
    """``grad_norm_<module>``: the 2-norm of all parameter gradients of encoder, cell, decoder,
    as Python floats (for records). Reads ``p.grad`` unless ``grads`` (name → gradient) is given.
    """
    return {k: float(v) for k, v in module_grad_norm_tensors(model, grads).items()}


def module_grad_norm_tensors(model: torch.nn.Module,
                             grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`module_grad_norms` as 0-d float64 tensors on the model's device: no host sync, so the
    norms of every training step can be logged without stalling an accelerator."""
    norms = {}
    for module in MODULES:
        parts = []
        for name, p in getattr(model, module).named_parameters(prefix=module):
            g = grads.get(name) if grads is not None else p.grad
            if g is not None:
                parts.append(torch.linalg.vector_norm(g.double()))
        norms[f"grad_norm_{module}"] = (torch.linalg.vector_norm(torch.stack(parts)) if parts
                                        else torch.zeros((), dtype=torch.float64))
    return norms


def total_grad_norm(model: torch.nn.Module) -> Tensor:
    """The 2-norm of every parameter gradient of the model together (what clipping by norm sees),
    a 0-d float64 tensor on the model's device (no host sync)."""
    parts = [torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()
             if p.grad is not None]
    return (torch.linalg.vector_norm(torch.stack(parts)) if parts
            else torch.zeros((), dtype=torch.float64))


def param_contribution_norms(probe_grads: dict[str, dict[str, Tensor | None]],
                             sum_over_processes: Reduce = None, world_size: int = 1) -> dict:
    """``dL_dW_<module>`` (T,) float64: ||dL/dW⁽ᵗ⁾|| over all parameters of the module at step t.

    ``probe_grads``: module → parameter name → the gradient of its probe, (T, *shape), or None
    for a parameter the loss does not reach (a zero contribution). Under data parallelism the
    per-process contributions are summed with ``sum_over_processes`` and divided by R before the
    norm (L = (1/R) Σ_r L_r).
    """
    record = {}
    for module, grads in probe_grads.items():
        squares = []
        for g in grads.values():
            if g is None:
                continue
            g = g.double()
            if sum_over_processes is not None:
                g = sum_over_processes(g) / world_size
            squares.append(g.flatten(1).square().sum(1))
        T = next((g.shape[0] for g in grads.values() if g is not None), 0)
        total = torch.stack(squares).sum(0) if squares else torch.zeros(T, dtype=torch.float64)
        record[f"dL_dW_{module}"] = total.sqrt().cpu().numpy()
    return record


def transition_jacobian_norms(cell: Cell, u: Tensor, previous_states: list[State],
                              dt: Tensor | None, iterations: int) -> Tensor:
    """Spectral norm of J_t = ∂z_t/∂z_{t−1} for every step and sequence: (T, B).

    ``u``: (B, T, input) the cell's inputs, ``previous_states[t]``: z_{t−1} (z_{−1} the initial
    state), ``dt``: (B, T) or None. For a state of several tensors (the LSTM's (h, c)) J_t is the
    Jacobian of the whole state, the tensors concatenated.

    Power iteration on J_tᵀJ_t from a fixed random start, for many (t, b) at once: the steps
    are batches of at most `JACOBIAN_ROWS` rows of ``cell.forward_mode_step`` (whole timesteps,
    so memory stays bounded at any T), whose rows are independent sequences (for an adaptive ODE
    solver the step size is then chosen over the rows of a batch together, which moves the result
    only within the solver's tolerance). The vector products are reverse-mode autograd on one
    graph of the step: Jᵀw by a vector-Jacobian product, Jv by differentiating w ↦ Jᵀw (linear
    in w) along v, so any differentiable step works, torchdiffeq's solvers included. The result
    is ||J_t v|| for the final unit vector v: a lower bound on σ_max that converges from below,
    at a rate (σ₂/σ₁)^(2·iterations). A cell with ``jacobian_norms`` (a diagonal J) gives the
    exact norms itself, and ``iterations`` is not used.
    """
    B, T = u.shape[:2]
    z = tuple(torch.cat(parts).detach() for parts in zip(*previous_states))  # row t·B + b
    u_rows = u.detach().transpose(0, 1).reshape(T * B, -1)
    dt_rows = dt.detach().transpose(0, 1).reshape(T * B) if dt is not None else None
    if cell.jacobian_norms is not None:
        with torch.no_grad():
            return cell.jacobian_norms(u_rows, z, dt_rows).reshape(T, B)
    generator = torch.Generator().manual_seed(JACOBIAN_SEED)
    v = tuple(torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device) for s in z)
    steps = max(1, JACOBIAN_ROWS // B)  # timesteps per batch
    norms = []
    for start in range(0, T * B, steps * B):
        rows = slice(start, start + steps * B)
        norms.append(power_iteration(cell, u_rows[rows], tuple(s[rows] for s in z),
                                     dt_rows[rows] if dt_rows is not None else None,
                                     tuple(p[rows] for p in v), iterations))
    return torch.cat(norms).reshape(T, B)


def power_iteration(cell: Cell, u: Tensor, z: tuple[Tensor, ...], dt: Tensor | None,
                    v: tuple[Tensor, ...], iterations: int) -> Tensor:
    """||J v|| per row after ``iterations`` power iterations on JᵀJ from ``v``, J = ∂step/∂z."""
    z = tuple(s.requires_grad_() for s in z)
    v = unit_rows(v)
    with torch.enable_grad():
        out = tuple(cell.forward_mode_step(u, z, dt))
        w = tuple(torch.zeros_like(o, requires_grad=True) for o in out)
        vjp_of_w = torch.autograd.grad(out, z, w, create_graph=True, allow_unused=True)
        vjp_of_w = tuple(g if g is not None else torch.zeros_like(s) * w[0].sum()
                         for g, s in zip(vjp_of_w, z))

        def jvp(vector: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return torch.autograd.grad(vjp_of_w, w, vector, retain_graph=True)

        def vjp(vector: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            grads = torch.autograd.grad(out, z, vector, retain_graph=True, allow_unused=True)
            return tuple(g if g is not None else torch.zeros_like(s) for g, s in zip(grads, z))

        for _ in range(iterations):
            v = unit_rows(vjp(jvp(v)))
        Jv = jvp(v)
    return row_norms(tuple(p.detach() for p in Jv))


def row_norms(parts: tuple[Tensor, ...]) -> Tensor:
    """The 2-norm of each row over all tensors together: (N, …) each → (N,)."""
    return torch.stack([p.flatten(1).square().sum(1) for p in parts]).sum(0).sqrt()


def unit_rows(parts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    norms = row_norms(parts).clamp_min(torch.finfo(parts[0].dtype).tiny)
    return tuple(p / norms.view(-1, *([1] * (p.dim() - 1))) for p in parts)


def jacobians(model, batch: dict[str, Tensor], iterations: int) -> dict:
    """The transition-Jacobian record of one batch, with the model's current weights.

    - ``jacobian_norm`` (T,): ||∂z_t/∂z_{t−1}||₂ as a map of the whole (B, state) tensor, i.e.
      the largest per-sequence spectral norm in the batch, so that
      ||∂L/∂z_{t−1}|| ≤ jacobian_norm[t]·||∂L/∂z_t|| wherever the loss is not read at t−1.
    - ``jacobian_rate``: mean log10 jacobian_norm[t] over t = 1 … T−1, the per-step rate that
      bound allows: log10_first_last ≤ (T−1)·jacobian_rate when the loss is read at T−1 only.
    - for a cell with ``recurrent_weight()`` (the RNN's W): ``recurrent_singular_values`` (H,)
      descending, ``recurrent_spectral_norm`` and ``recurrent_spectral_radius`` (max |λ|).

    The states come from one more pass of the model's loop (no gradient). The analysis runs in
    eval mode, as analysis does, so it neither counts as training work (an ODE cell's NFE) nor
    draws training randomness; the model's mode is restored after.
    """
    x, dt = batch["x"], batch.get("dt")
    previous: list[State] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            u = model.encoder(x)
            model.unroll(u, dt, previous_states=previous)
        norms = transition_jacobian_norms(model.cell, u, previous, dt, iterations)
    finally:
        model.train(was_training)
    record = jacobian_summary(norms.amax(1).double().cpu().numpy())
    record.update(recurrent_spectrum(model.cell))
    return record


def jacobian_summary(jacobian_norm: np.ndarray) -> dict:
    """``jacobian_norm`` (T,) and its ``jacobian_rate``, mean log10 over t = 1 … T−1."""
    with np.errstate(divide="ignore"):
        log = np.log10(jacobian_norm[1:])
    log = log[np.isfinite(log)]
    return {"jacobian_norm": jacobian_norm,
            "jacobian_rate": float(log.mean()) if log.size else float("nan")}


def jacobian_bound(dL_dz: np.ndarray, jacobian_norm: np.ndarray) -> np.ndarray:
    """||dL/dz_{T−1}||·Π_{s=t+1}^{T−1} jacobian_norm[s], (T,): an upper bound on ||dL/dz_t||
    when the loss reads step T−1 only (then ∂L/∂z_{s−1} = J_sᵀ ∂L/∂z_s for every s)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(jacobian_norm, dtype=np.float64))
    after = np.concatenate([np.cumsum(logs[:0:-1])[::-1], [0.0]])  # Σ_{s>t} log ||J_s||
    with np.errstate(over="ignore"):  # beyond float64: inf, no bound worth the name
        return np.asarray(dL_dz, dtype=np.float64)[-1] * np.exp(after)


def recurrent_spectrum(cell: Cell) -> dict:
    """Singular values, spectral norm and spectral radius of ``cell.recurrent_weight()``, if any."""
    accessor = getattr(cell, "recurrent_weight", None)
    if accessor is None:
        return {}
    W = accessor().detach().double().cpu()
    singular = torch.linalg.svdvals(W)
    return {"recurrent_singular_values": singular.numpy(),
            "recurrent_spectral_norm": float(singular[0]),
            "recurrent_spectral_radius": float(torch.linalg.eigvals(W).abs().max())}


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


def grad_flow(model, batch: dict[str, Tensor], param_contributions: bool = False,
              jacobian_iterations: int = 0) -> dict[str, np.ndarray | float]:
    """One batch's exact gradient flow, without touching ``.grad`` of the model's parameters.

    Returns ``dL_dz`` (T,) float64 (plus ``dL_d<s>`` for every further state, e.g. ``dL_dc`` for
    the LSTM), ``grad_norm_<module>`` for encoder, cell and decoder, ``loss``, and the
    `summarize` scalars; with ``param_contributions`` also ``dL_dW_<module>`` (T,); with
    ``jacobian_iterations`` > 0 also the `jacobians` record.
    """
    x = batch["x"]
    probes = model.make_probes(x.shape[0], x.shape[1])
    param_probes = model.make_param_probes(x.shape[1]) if param_contributions else None
    loss = model.loss_fn(model(x, batch.get("dt"), probes, param_probes), batch["y"])
    flat_probes = [(m, n, q) for m, qs in (param_probes or {}).items() for n, q in qs.items()]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        loss, [*probes, *(q for _, _, q in flat_probes), *(p for _, p in named)],
        allow_unused=True)
    state_grads, grads = grads[: len(probes)], grads[len(probes):]
    probe_grads, param_grads = grads[: len(flat_probes)], grads[len(flat_probes):]
    record = probe_profile(model.cell.state_names, state_grads)
    if param_probes is not None:
        by_module: dict[str, dict] = {m: {} for m in param_probes}
        for (m, n, _), g in zip(flat_probes, probe_grads):
            by_module[m][n] = g
        record.update(param_contribution_norms(by_module))
    record.update(module_grad_norms(model, dict(zip((n for n, _ in named), param_grads))))
    record["loss"] = float(loss.detach())
    record.update(summarize(record["dL_dz"]))
    if jacobian_iterations:
        record.update(jacobians(model, batch, jacobian_iterations))
    return record


def record_path(directory: str | Path, step: int) -> Path:
    """Where `save` writes the record of ``step``: ``<directory>/step_<step:07d>.npz``."""
    return Path(directory) / f"step_{step:07d}.npz"


def save(directory: str | Path, step: int, record: dict) -> Path:
    """Write one monitored step as ``step_<step:07d>.npz`` (float64 arrays, scalars as 0-d)."""
    path = record_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in record.items()}
    arrays["step"] = np.asarray(step, dtype=np.int64)
    arrays["T"] = np.asarray(len(record["dL_dz"]), dtype=np.int64)
    np.savez(path, **arrays)
    return path


def load(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Stack every ``grad_flow/step_*.npz`` under ``run_dir``, ordered by step.

    Returns arrays with a leading steps axis: ``dL_dz`` (steps, T), ``step`` (steps,), …. A key
    that only some records hold (``jacobian_norm`` on steps without the Jacobians) is NaN in the
    others.
    """
    files = sorted(Path(run_dir).glob("**/grad_flow/step_*.npz"))
    if not files:
        raise FileNotFoundError(
            f"no grad_flow/step_*.npz under {run_dir}: is it a run directory of "
            "scripts/train.py with the monitor on (monitor.every_n_steps)?")
    records = [dict(np.load(f)) for f in files]
    records.sort(key=lambda r: int(r["step"]))
    shapes = {k: np.shape(v) for r in reversed(records) for k, v in r.items()}
    return {k: np.stack([r[k] if k in r else np.full(shape, np.nan) for r in records])
            for k, shape in sorted(shapes.items())}
