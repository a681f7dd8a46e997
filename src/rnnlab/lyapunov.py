"""Lyapunov spectra of the backward product: the rate at which gradients shrink or grow in time.

Backpropagation multiplies ∂L/∂z_t by the transposed transition Jacobians, ∂L/∂z_{t−1} =
J_tᵀ ∂L/∂z_t with J_t = ∂z_t/∂z_{t−1}. The norm of a product is not the product of the norms:
how fast J_{t+1}ᵀ … J_{T−1}ᵀ stretches or shrinks vectors is given by its Lyapunov exponents
(Engelken, Wolf & Abbott 2023; Vogt et al. 2022). They are measured by carrying k orthonormal
vectors backward from t = T−1 and re-orthonormalising them with QR (Benettin's method): the
logarithms of R's diagonal, summed and divided by the number of steps, are the exponents.

    λ_i = (1/n) Σ_t log10 |R_ii(t)|     (decades per step, descending; n = steps after warm-up)

The vector–Jacobian products Jᵀv are reverse-mode autograd through one ``cell.step`` at a time,
so any cell with a differentiable step works (ODE solvers, the adjoint, a user's cell), and only
the trajectory z_t of the measured sequences is kept: memory grows with T only by that trajectory.
The k vectors of a sequence are k rows of one batch: its z_{t−1} and u_t repeated k times, one
cotangent per row.

- `backward_spectrum`: the raw result for a few sequences (`BackwardSpectrum`).
- `module_lyapunov`: the same per layer and direction of a `torch.nn` RNN, GRU or LSTM;
  `watched_lyapunov` turns it into the record's section of a watched module (one row per layer
  and direction, as its profiles).
- `mean_over_processes`: the section of the global batch under data parallelism.
- `lyapunov`: the instrument on rnnlab's model and a batch, returning the record's `Lyapunov`
  section: the batch-mean spectrum, the per-sequence spectra, the predicted profile and the
  predicted decay rate (how the prediction is made: `predicted_profile`); for a cell with a time
  step, the spectrum per unit of time too (`elapsed_time`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.cells.gated import cell_step
from rnnlab.config import require_int
from rnnlab.records import Lyapunov, summarize
from rnnlab.unrolled import MODES, initial_states, row_names

# The first tenth of the steps (from T−1 backward) aligns the random initial vectors with the
# Lyapunov vectors; the exponents average the steps after it. The prediction uses every step.
WARMUP_FRACTION = 0.1
LYAPUNOV_SEED = 0  # the initial vectors are the same on every call (`initial_vectors`)


@dataclass
class BackwardSpectrum:
    """What one backward QR pass over S sequences measured.

    ``exponents`` (S, k): per-sequence finite-time exponents in log10 per step, descending, over
    the steps after the warm-up. ``top_growth`` (T, S): log10 of the factor by which the first
    vector grew through J_tᵀ at each t = 1 … T−1 (0 at t = 0, which has no J_t applied in the
    profile). ``steps``: how many steps the exponents average.
    """

    exponents: np.ndarray
    top_growth: np.ndarray
    steps: int


def initial_vectors(S: int, D: int, k: int, like: Tensor) -> Tensor:
    """The k orthonormal vectors (S, D, k) the backward QR pass starts from: the same for every
    sequence and on every call (drawn from `LYAPUNOV_SEED`), so that a sequence's spectrum does
    not depend on the batch, or the process under data parallelism, that measures it. Dtype and
    device of ``like``."""
    generator = torch.Generator().manual_seed(LYAPUNOV_SEED)
    Q = torch.linalg.qr(torch.randn(D, k, generator=generator, dtype=torch.float64))[0]
    return Q.to(dtype=like.dtype, device=like.device).expand(S, D, k).contiguous()


def warmup_steps(T: int, ons_every: int) -> int:
    """Steps (from T−1 backward) left out of the exponents: `WARMUP_FRACTION` of the T−1 steps,
    rounded down to a multiple of the re-orthonormalisation interval."""
    warmup = int(WARMUP_FRACTION * (T - 1))
    return warmup - warmup % ons_every


def backward_spectrum(cell: Cell, u: Tensor, previous_states: list[State], dt: Tensor | None,
                      k: int, ons_every: int = 1) -> BackwardSpectrum:
    """The top k Lyapunov exponents of J_{T−1}ᵀ … J_1ᵀ for every sequence of ``u``.

    ``u``: (S, T, input) the cell's inputs; ``previous_states[t]``: z_{t−1} (S, …) per state
    tensor; ``dt``: (S, T) or None. For a state of several tensors (the LSTM's (h, c)) the
    vectors live in their concatenation. ``ons_every``: re-orthonormalise every this many steps
    (the first vector is normalised every step, which leaves the span and the other R_ii as
    they are, so the top exponent's growth is known per step).
    """
    S, T = u.shape[:2]
    widths = [s.shape[1] for s in previous_states[0]]
    D = sum(widths)
    k = min(k, D)
    Q = initial_vectors(S, D, k, previous_states[0][0])  # (S, D, k)
    top_growth = torch.zeros(T, S, dtype=torch.float64)
    log_r = torch.zeros(T, S, k, dtype=torch.float64)
    inputs = u.detach().unbind(1)
    dts = dt.detach().unbind(1) if dt is not None else (None,) * T
    transition = getattr(cell, "transition_jacobian", None)
    for n, t in enumerate(range(T - 1, 0, -1), start=1):
        z = tuple(s.detach().repeat_interleave(k, 0) for s in previous_states[t])
        u_t = inputs[t].repeat_interleave(k, 0)
        dt_t = dts[t].repeat_interleave(k, 0) if dts[t] is not None else None
        cotangent = Q.transpose(1, 2).reshape(S * k, D)
        V = transposed_products(cell.step, transition, u_t, z, dt_t, cotangent, widths)
        V = V.reshape(S, k, D).transpose(1, 2)  # column i: J_tᵀ q_i
        top = V[:, :, 0].norm(dim=1)
        top_growth[t] = torch.log10(top).double().cpu()
        V = torch.cat([V[:, :, :1] / top[:, None, None], V[:, :, 1:]], 2)
        if n % ons_every == 0 or t == 1:
            Q, R = torch.linalg.qr(V)
            diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
            log_r[t] = torch.log10(diagonal).double().cpu()
            log_r[t, :, 0] = 0.0  # R_11 = 1: the first vector's growth is in top_growth
        else:
            Q = V
    warmup = warmup_steps(T, ons_every)
    counted = slice(1, T - warmup)  # t = 1 … T−1−warmup
    steps = T - 1 - warmup
    sums = log_r[counted].sum(0)
    sums[:, 0] = top_growth[counted].sum(0)
    exponents = (sums / max(steps, 1)).numpy()
    return BackwardSpectrum(-np.sort(-exponents, axis=1), top_growth.numpy(), steps)


def transposed_products(step, transition, u_t: Tensor, z: tuple[Tensor, ...], dt_t: Tensor | None,
                        w: Tensor, widths: list[int]) -> Tensor:
    """Jᵀ w per row of the flattened state (N, D), J = ∂step/∂z at (u_t, z): by the cell's
    written-out `transition_jacobian` where it has one (no autograd graph), else a
    vector–Jacobian product of ``step``."""
    if transition is not None:
        with torch.no_grad():
            return transition(u_t, z, dt_t)[1](w)
    z = tuple(s.requires_grad_() for s in z)
    with torch.enable_grad():
        grads = torch.autograd.grad(step(u_t, z, dt_t), z, w.split(widths, 1),
                                    allow_unused=True)
    return torch.cat([g if g is not None else torch.zeros_like(s) for g, s in zip(grads, z)], 1)


def elapsed_time(cell: Cell, dt: Tensor | None, steps: int) -> np.ndarray | None:
    """The time (S, 1) spanned by the steps t = 1 … ``steps`` that the exponents average, for a
    cell with a time step (a number ``cell.dt``: the neural ODE, coRNN, LEM): Σ_t dt[:, t] when
    the task supplies the gaps ``dt`` (S, T), else steps · cell.dt; None for a discrete cell.
    The exponents per unit of time are then the total log10 growth over that time: per step
    · steps / time, which is per step / cell.dt for a fixed step."""
    step = getattr(cell, "dt", None)
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return None
    if dt is not None:
        return dt[:, 1:steps + 1].detach().double().sum(1, keepdim=True).cpu().numpy()
    return np.full((1, 1), float(step) * steps)


def predicted_profile(top_growth: np.ndarray, last: float) -> np.ndarray:
    """The profile the spectrum predicts, (T,): ``last`` · 10^{P(t)}, where

        P(t) = log10 √( mean_b 10^{2 G_b(t)} ),   G_b(t) = Σ_{s=t+1}^{T−1} top_growth[s, b]

    G_b(t) is the finite-time top exponent of sequence b summed from T−1 back to t (the running
    form of λ₁·(T−1−t)), and the batch's Frobenius norm adds the sequences' squared norms: the
    log-mean-exp makes the slowest-decaying sequence dominate, as it does in the measured batch
    norm. Every sequence starts from the same norm at T−1 (``last`` = ‖∂L/∂z_{T−1}‖), so the
    prediction is of the profile's shape, not of how the loss weighs the sequences."""
    after = np.concatenate([np.cumsum(top_growth[:0:-1], axis=0)[::-1],
                            np.zeros((1, top_growth.shape[1]))])  # G_b(t), (T, S)
    peak = after.max(1, keepdims=True)
    log_mean = peak[:, 0] + 0.5 * np.log10(np.mean(10.0 ** (2 * (after - peak)), axis=1))
    return last * 10.0 ** log_mean


def lyapunov(model, batch: dict[str, Tensor], k: int, ons_every: int = 1,
             sequences: int | None = None, last_norm: float = 1.0) -> Lyapunov:
    """The Lyapunov spectrum of the backward product of rnnlab's model on one batch.

    ``k``: how many exponents (at most the state's size). ``sequences``: how many of the
    batch's sequences (the first ones) to measure; None: all. ``last_norm``: ‖∂L/∂z_{T−1}‖ of the
    batch, the predicted profile's value at T−1 (`predicted_profile`).

    - ``lyapunov`` (k,): the mean over the sequences of their exponents, log10 per step.
    - ``lyapunov_per_sequence`` (S, k).
    - ``lyapunov_prediction`` (T,): the predicted profile.
    - ``predicted_decay_rate``: the decay rate of ``lyapunov_prediction``, fitted as the
      measured ``decay_rate`` is (least squares of log10 against T−1−t): the number to set
      beside it.
    - ``lyapunov_per_time`` (k,): for a cell with a time step, the mean over the sequences of
      their exponents in log10 per unit of time (`elapsed_time`); None for a discrete cell.

    The trajectory comes from one more pass of the model's loop over the measured sequences (no
    gradient), in eval mode as `rnnlab.gradflow.jacobians` does.
    """
    k = require_int("monitor.lyapunov_k", k)
    ons_every = require_int("monitor.lyapunov_ons_every", ons_every)
    x, dt = batch["x"], batch.get("dt")
    S = x.shape[0] if sequences is None else min(require_int("monitor.lyapunov_sequences",
                                                             sequences), x.shape[0])
    x = x[:S]
    dt = dt[:S] if dt is not None else None
    with model.trajectory(x, dt) as (u, previous):
        spectrum = backward_spectrum(model.cell, u, previous, dt, k, ons_every)
    prediction = predicted_profile(spectrum.top_growth, last_norm)
    time = elapsed_time(model.cell, dt, spectrum.steps)
    per_time = None if time is None else (spectrum.exponents * spectrum.steps / time).mean(0)
    return Lyapunov(lyapunov=spectrum.exponents.mean(0), lyapunov_per_sequence=spectrum.exponents,
                    lyapunov_prediction=prediction,
                    predicted_decay_rate=summarize(prediction)["decay_rate"],
                    lyapunov_per_time=per_time)


class LayerStep:
    """One layer and direction of a `torch.nn` RNN, GRU or LSTM as a ``step(u_t, state, dt)``
    for `backward_spectrum`: ``u_t`` is the step's input projection W_ih x_t + b_ih (+ b_hh but
    in the GRU), ``state`` (h,) or the LSTM's (h, c); the step is `rnnlab.cells.gated.cell_step`,
    the function the watched module's probed pass runs."""

    def __init__(self, module: nn.RNNBase, name: str):
        self.mode = module.mode
        self.w_hh = getattr(module, f"weight_hh_{name}")
        self.b_hh = getattr(module, f"bias_hh_{name}") if module.bias else None
        self.w_hr = getattr(module, f"weight_hr_{name}") if module.proj_size else None

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        h, c = cell_step(self.mode, u_t, state[0], state[1] if len(state) > 1 else None,
                         self.w_hh, self.b_hh, self.w_hr)
        return (h,) if c is None else (h, c)


def module_lyapunov(module: nn.RNNBase, x: Tensor, k: int, ons_every: int = 1,
                    hx: Tensor | tuple[Tensor, Tensor] | None = None
                    ) -> dict[str, BackwardSpectrum]:
    """The backward spectrum of every layer and direction of ``module`` (`torch.nn.RNN`, `GRU`
    or `LSTM`) on the batch ``x`` (B, T, features) if ``module.batch_first`` else (T, B,
    features), from the initial state ``hx`` as the module takes it (None: zeros):
    ``{"l0": …, "l0_reverse": …, "l1": …}`` (`row_names`), each layer's
    J_t = ∂(h_t, c_t)/∂(h_{t−1}, c_{t−1}) along its own trajectory (a reverse direction's time
    runs backward). The trajectory comes from one pass without gradient, in eval mode (no
    dropout between layers)."""
    if module.mode not in MODES:
        raise ValueError(f"cannot take the spectrum of a {type(module).__name__} of mode "
                         f"{module.mode}")
    x = x if module.batch_first else x.transpose(0, 1)  # (B, T, features)
    B = x.shape[0]
    D = 2 if module.bidirectional else 1
    names = row_names(module)
    spectra = {}
    layer_input = x.detach()
    h0, c0 = initial_states(module, hx, B, layer_input, unbatched=False, sorted_indices=None)
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(D):
            name = names[layer * D + direction]
            step = LayerStep(module, name)
            with torch.no_grad():
                u = F.linear(layer_input, getattr(module, f"weight_ih_{name}"),
                             getattr(module, f"bias_ih_{name}") if module.bias else None)
                if module.bias and module.mode != "GRU":
                    u = u + step.b_hh
                u = u.flip(1) if direction else u
                h = h0[layer * D + direction].detach().to(u.dtype)
                state = (h,) if c0 is None else (h, c0[layer * D + direction].detach().to(u.dtype))
                previous, out = [], []
                for u_t in u.unbind(1):
                    previous.append(state)
                    state = step.step(u_t, state, None)
                    out.append(state[0])
            spectra[name] = backward_spectrum(step, u, previous, None, k, ons_every)
            out = torch.stack(out, 1)
            outputs.append(out.flip(1) if direction else out)
        layer_input = torch.cat(outputs, 2)
    return spectra


def watched_lyapunov(module: nn.RNNBase, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None,
                     profile: np.ndarray, k: int, ons_every: int = 1,
                     sequences: int | None = None) -> Lyapunov:
    """The record's `Lyapunov` section of a watched `torch.nn` RNN, GRU or LSTM, one row per
    layer and direction (`row_names`, the rows of its profiles), from `module_lyapunov` of the
    input ``x`` and initial state ``hx`` the module was called with (batched or not, as
    ``module.batch_first`` says). ``profile`` (rows, T): its ‖∂L/∂h_t‖, whose value at each
    row's last step starts that row's prediction. ``sequences``: the first this many of the
    batch (None: all).

    - ``lyapunov`` (rows, k), ``lyapunov_per_sequence`` (rows, S, k): log10 per step.
    - ``lyapunov_prediction`` (rows, T): `predicted_profile` of each row. A reverse direction's
      time runs from t = T−1 down to 0: its prediction starts from ‖∂L/∂h_0‖ and is flipped
      into the forward time of the profile.
    - ``predicted_decay_rate`` (rows,): fitted as the row's ``decay_rate`` is.
    """
    batch_dim = 0 if module.batch_first else 1
    if x.dim() == 2:  # unbatched: one sequence
        x = x.unsqueeze(batch_dim)
        hx = None if hx is None else (hx.unsqueeze(1) if isinstance(hx, Tensor)
                                      else tuple(h.unsqueeze(1) for h in hx))
    S = x.shape[batch_dim] if sequences is None else min(sequences, x.shape[batch_dim])
    x = x.narrow(batch_dim, 0, S)
    hx = None if hx is None else (hx[:, :S] if isinstance(hx, Tensor)
                                  else tuple(h[:, :S] for h in hx))
    spectra = module_lyapunov(module, x, k, ons_every, hx)
    profile = np.atleast_2d(profile)
    predictions = []
    for row, (name, spectrum) in enumerate(spectra.items()):
        if name.endswith("_reverse"):
            predictions.append(predicted_profile(spectrum.top_growth, profile[row, 0])[::-1])
        else:
            predictions.append(predicted_profile(spectrum.top_growth, profile[row, -1]))
    prediction = np.stack(predictions)
    per_sequence = np.stack([s.exponents for s in spectra.values()])
    return Lyapunov(lyapunov=per_sequence.mean(1), lyapunov_per_sequence=per_sequence,
                    lyapunov_prediction=prediction,
                    predicted_decay_rate=decay_rates(prediction))


def decay_rates(prediction: np.ndarray) -> float | np.ndarray:
    """The decay rate of a predicted profile (T,), or of each row of (rows, T)."""
    if prediction.ndim == 1:
        return summarize(prediction)["decay_rate"]
    return np.array([summarize(row)["decay_rate"] for row in prediction])


def mean_over_processes(section: Lyapunov, reduce: Callable[[np.ndarray, str], np.ndarray],
                        world_size: int) -> Lyapunov:
    """The section of the global batch from each process's own, under data parallelism.

    ``reduce(array, op)``: the elementwise ``op`` ("sum" or "max") of ``array`` over the
    processes. Each process measured as many sequences as the others (equal batches), so

    - ``lyapunov`` and ``lyapunov_per_time``: the mean over processes of their means;
    - ``lyapunov_prediction``: the root mean square over processes, which is the prediction of
      all their sequences together: `predicted_profile` is ``last`` · √(mean_b 10^{2 G_b(t)}),
      and every process starts from the same ``last`` (the profile is the global batch's).
      Summed in log10 with the largest subtracted, so decades below float64's range survive;
    - ``predicted_decay_rate``: refitted to that prediction;
    - ``lyapunov_per_sequence``: this process's sequences, as measured.
    """
    def mean(values: np.ndarray) -> np.ndarray:
        return reduce(values, "sum") / world_size

    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(section.lyapunov_prediction)
        peak = reduce(log, "max")
        shift = np.where(np.isfinite(peak), peak, 0.0)
        prediction = 10.0 ** (shift + 0.5 * np.log10(mean(10.0 ** (2 * (log - shift)))))
    per_time = section.lyapunov_per_time
    return replace(section, lyapunov=mean(section.lyapunov), lyapunov_prediction=prediction,
                   predicted_decay_rate=decay_rates(prediction),
                   lyapunov_per_time=None if per_time is None else mean(per_time))


@dataclass
class LongTermJacobian:
    """∂z_{T−1}/∂z_t of one sequence at chosen t: what gradient flossing controls.

    ``t`` (n,); ``singular_values`` (n, r) the top r, descending; ``condition`` (n,) σ_max/σ_min
    over the whole state; ``alignment`` (n, r): (u_iᵀ g)² / ‖g‖² for the left singular vectors
    u_i and g = ∂L/∂z_{T−1}, the share of the gradient that the i-th direction amplifies by σ_i
    on its way back to t (∂L/∂z_t = Mᵀ g = Σ σ_i (u_iᵀ g) v_i).
    """

    t: np.ndarray
    singular_values: np.ndarray
    condition: np.ndarray
    alignment: np.ndarray


def long_term_jacobian(model, batch: dict[str, Tensor], dL_dz_last: tuple[Tensor, ...],
                       timesteps: list[int], top: int = 4, sequence: int = 0
                       ) -> LongTermJacobian:
    """M_t = ∂z_{T−1}/∂z_t = J_{T−1} … J_{t+1} of ``sequence`` at each of ``timesteps``, exactly:
    Mᵀ is carried backward from the identity by vector–Jacobian products of ``cell.step`` (D
    vectors, D the state's size), then `torch.linalg.svd`. ``dL_dz_last``: ∂L/∂z_{T−1} of that
    sequence, one (D_i,) tensor per state."""
    x, dt = batch["x"][sequence:sequence + 1], batch.get("dt")
    dt = dt[sequence:sequence + 1] if dt is not None else None
    with model.trajectory(x, dt) as (u, previous):
        T = u.shape[1]
        wanted = sorted({t % T for t in timesteps})
        widths = [s.shape[1] for s in previous[0]]
        D = sum(widths)
        first = previous[0][0]
        Mt = torch.eye(D, dtype=first.dtype, device=first.device)  # rows: Mᵀ's columns, carried
        inputs = u.detach().unbind(1)
        dts = dt.unbind(1) if dt is not None else (None,) * T
        found = {}
        if T - 1 in wanted:
            found[T - 1] = Mt.clone()
        for t in range(T - 1, min(wanted), -1):  # applies J_tᵀ: from z_t's cotangent to z_{t−1}'s
            z = tuple(s.detach().expand(D, -1).clone().requires_grad_() for s in previous[t])
            with torch.enable_grad():
                out = model.cell.step(inputs[t].expand(D, -1), z,
                                      dts[t].expand(D) if dts[t] is not None else None)
                grads = torch.autograd.grad(out, z, Mt.split(widths, 1), allow_unused=True)
            Mt = torch.cat([g if g is not None else torch.zeros_like(s)
                            for g, s in zip(grads, z)], 1)
            if t - 1 in wanted:
                found[t - 1] = Mt.clone()
    g = torch.cat([p.reshape(-1) for p in dL_dz_last]).double().cpu()
    values, conditions, alignments = [], [], []
    for t in wanted:
        # Row j of Mt is (Mᵀ e_j)ᵀ = row j of M: Mt is M itself.
        U, sigma, _ = torch.linalg.svd(found[t].double().cpu())
        values.append(sigma[:top].numpy())
        conditions.append(float(sigma[0] / sigma[-1]) if sigma[-1] > 0 else float("inf"))
        alignments.append(((U[:, :top].T @ g) ** 2 / g.square().sum()).numpy())
    return LongTermJacobian(np.array(wanted), np.stack(values), np.array(conditions),
                            np.stack(alignments))
