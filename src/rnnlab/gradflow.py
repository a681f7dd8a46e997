"""The gradient-flow instruments: what is measured on a monitored step, a function each.

- the profile ``dL_dz[t] = ‖∂L/∂z_t‖_F`` over the (B, hidden) state, for the batch-mean loss L,
  where ∂/∂z_t is the total derivative through every later step: zero probes added to the states
  (`rnnlab.probing`), one backward pass;
- the per-step parameter contributions ``dL_dW_<module>[t] = ‖dL/dW⁽ᵗ⁾‖``: the parameters are
  shared in time, so dL/dW = Σ_t dL/dW⁽ᵗ⁾; zero parameter probes, the same backward pass;
- the parameter-gradient norm of each top-level module (`module_grad_norms`);
- the transition Jacobians ``jacobian_norm[t] = ‖∂z_t/∂z_{t−1}‖₂`` by Lanczos (`jacobians`):
  since ∂L/∂z_{t−1} = J_tᵀ ∂L/∂z_t wherever the loss is not read at t−1, the product of these
  norms bounds the decay or growth of the profile — the cause next to the effect;
- the spectrum of a cell's recurrent matrix (`recurrent_spectrum`);
- the Lyapunov spectrum of the backward product and the profile it predicts (`rnnlab.lyapunov`):
  the rate the product of Jacobians actually shrinks or stretches gradients, where the product of
  their norms only bounds it.

`grad_flow(model, batch)` runs them all on one batch and returns the `rnnlab.records.Record`; the
monitor (`rnnlab.callbacks.GradFlowCallback`) runs them during training and writes the records,
which `load` stacks into (steps, T) arrays.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rnnlab.cells.base import Cell, State
from rnnlab.lyapunov import lyapunov
from rnnlab.probing import ProbeRequest
from rnnlab.records import Jacobians, Record, Spectrum, load, summarize

__all__ = ["grad_flow", "jacobians", "load", "module_grad_norms", "recurrent_spectrum",
           "summarize", "total_grad_norm"]

# Rows (timestep × sequence) per batch of the Jacobian Lanczos iteration: bounds its memory
# (16,384 took 2.4× the memory and more time, the batch no longer in the cache; README).
JACOBIAN_ROWS = 4096
JACOBIAN_SEED = 0  # Lanczos starts from the same vector on every call
# Batches of rows per segment of the trajectory the Jacobians hold at once (`jacobians`): at
# B = 64, 1024 timesteps (a GRU's states: 34 MB, not 328 MB at T = 10,000).
JACOBIAN_SEGMENTS = 16


def module_grad_norms(model: torch.nn.Module, grads: dict[str, Tensor] | None = None) -> dict:
    """``grad_norm_<module>``: the 2-norm of all parameter gradients of each top-level module
    (encoder, cell, decoder of rnnlab's model), as Python floats (for records). Reads ``p.grad``
    unless ``grads`` (name → gradient) is given.
    """
    return {k: float(v) for k, v in module_grad_norm_tensors(model, grads).items()}


def module_grad_norm_tensors(model: torch.nn.Module,
                             grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`module_grad_norms` as 0-d float64 tensors on the model's device: no host sync, so the
    norms of every training step can be logged without stalling an accelerator."""
    return GradNorms(model).modules(grads)


def total_grad_norm(model: torch.nn.Module) -> Tensor:
    """The 2-norm of every parameter gradient of the model together (what clipping by norm sees),
    a 0-d float64 tensor on the model's device (no host sync)."""
    return GradNorms(model).total()  # nothing taken yet: every gradient read


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """‖g‖² of each tensor, accumulated in float64: (len(tensors),), one `torch._foreach_norm`
    for all of them (the same values as `torch.linalg.vector_norm` with ``dtype=float64``, one
    operation where a norm each and their combinations took about twenty a step)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    return norms.mul_(norms)


class GradNorms:
    """The gradient norms a monitor logs on every training step of one model: each top-level
    module's and the whole model's after the backward pass (`take`, one vector) and the whole
    model's again before the optimizer step (`total`), the numbers of `module_grad_norm_tensors`
    and `total_grad_norm`, as float64 tensors (no host sync).

    Every gradient's ‖g‖² comes from one `squared_norms`, and the modules' norms and the total
    from one product with a 0/1 membership matrix (a row per module, then a row of ones), so a
    step costs a handful of operations whatever the number of parameters. `total` reuses what
    `take` measured of gradients that are still the same tensors, unwritten since (their version
    counters: clipping, a hook that scales the gradients, an accumulating backward pass each
    bump them), and reads any other again."""

    def __init__(self, model: torch.nn.Module):
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        position = {id(p): i for i, p in enumerate(self.params)}
        groups = [(f"grad_norm_{name}", [position[id(p)] for p in child.parameters()])
                  for name, child in model.named_children()]
        self.groups = [(key, members) for key, members in groups if members]
        self.keys = [key for key, _ in self.groups]  # the modules, in `take`'s order
        self.membership: dict[tuple, Tensor] = {}  # (gradients present, device) → (M + 1, n)
        # the last `take`'s gradients (index, tensor, version), their squares and its vector
        self.taken: tuple[list[tuple[int, Tensor, int]], Tensor, Tensor] | None = None

    def gradients(self, grads: dict[str, Tensor] | None = None) -> list[tuple[int, Tensor]]:
        """(index, gradient) of every parameter that has one: ``p.grad``, or ``grads[name]``."""
        if grads is None:
            return [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        return [(i, g) for i, name in enumerate(self.names)
                if (g := grads.get(name)) is not None]

    def norms(self, present: list[tuple[int, Tensor]]) -> tuple[Tensor, Tensor]:
        """(each module's norm then the total (M + 1,), each gradient's square (n,)) of the
        gradients ``present`` (`gradients`); a module without gradients has norm 0."""
        squares = squared_norms([g for _, g in present])
        if not present:
            return torch.zeros(len(self.groups) + 1, dtype=torch.float64), squares
        indices = tuple(i for i, _ in present)
        matrix = self.membership.get((indices, squares.device))
        if matrix is None:
            rows = [[float(i in members) for i in indices] for _, members in self.groups]
            matrix = torch.tensor(rows + [[1.0] * len(indices)], dtype=torch.float64)
            matrix = self.membership[indices, squares.device] = matrix.to(squares.device)
        return torch.mv(matrix, squares).sqrt_(), squares

    def take(self) -> Tensor:
        """(M + 1,): the norm of each top-level module with parameters (in `keys`' order, 0
        without gradients), then of all of them, from ``p.grad``; `total` may reuse it."""
        present = self.gradients()
        vector, squares = self.norms(present)
        self.taken = ([(i, g, g._version) for i, g in present], squares, vector)
        return vector

    def named(self, vector: Tensor) -> dict[str, Tensor]:
        """``grad_norm_<module>`` → its norm, of a `take` vector (0-d views)."""
        return dict(zip(self.keys, vector.unbind()))

    def modules(self, grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``grad_norm_<module>`` of every top-level module with parameters (0 without
        gradients): `take`'s, or of ``grads`` (name → gradient) instead of ``p.grad`` (then
        nothing is kept for `total`)."""
        if grads is None:
            return self.named(self.take())
        return self.named(self.norms(self.gradients(grads))[0])

    def total(self) -> Tensor:
        """The 2-norm of every parameter gradient together (`total_grad_norm`). Lets go of the
        gradients `take` kept (no step's gradients outlive it here: a large model's would
        double their memory into the next step); a later call reads them all."""
        taken, self.taken = self.taken, None
        present = self.gradients()
        if not present:
            return torch.zeros((), dtype=torch.float64)
        seen = {i: (k, g, version) for k, (i, g, version) in enumerate(taken[0])} if taken else {}
        kept, fresh = [], []
        for i, grad in present:
            k, g, version = seen.get(i, (None, None, None))
            if g is grad and version == grad._version:
                kept.append(k)
            else:
                fresh.append(grad)
        if not fresh and len(kept) == len(taken[1]):
            return taken[2][-1]  # every gradient as `take` found it
        # (only non-empty parts: an empty one would be on the CPU)
        squares = torch.cat(([squared_norms(fresh)] if fresh else [])
                            + ([taken[1][kept]] if kept else []))
        return squares.sum().sqrt()


def jacobian_batch_steps(batch_size: int) -> int:
    """Timesteps per batch of `JACOBIAN_ROWS` (timestep, sequence) rows, at least 1."""
    return max(1, JACOBIAN_ROWS // batch_size)


def transition_jacobian_norms(cell: Cell, u: Tensor, previous_states: list[State],
                              dt: Tensor | None, iterations: int,
                              generator: torch.Generator | None = None) -> Tensor:
    """Spectral norm of J_t = ∂z_t/∂z_{t−1} for every step and sequence: (T, B).

    ``u``: (B, T, input) the cell's inputs, ``previous_states[t]``: z_{t−1} (z_{−1} the initial
    state), ``dt``: (B, T) or None. For a state of several tensors (the LSTM's (h, c)) J_t is the
    Jacobian of the whole state, the tensors concatenated.

    Lanczos on J_tᵀJ_t (`lanczos_norms`) from a fixed random start, for many (t, b) at once:
    the steps are batches of at most `JACOBIAN_ROWS` rows of ``cell.forward_mode_step`` (whole
    timesteps; only a batch's states, inputs and start vectors are copied into rows, so memory
    stays bounded at any T), whose rows are independent sequences (for an adaptive ODE solver the
    step size is then chosen over the rows of a batch together, which moves the result only
    within the solver's tolerance). The start vectors are one random stream drawn step by step,
    the same for any batching. The products JᵀJ q come from the cell's own
    ``transition_jacobian`` where it has one (the Elman RNN, GRU, LSTM), else from autograd on
    one graph of the step (`normal_products`), which works for any differentiable step. The result
    is a Ritz value: a lower bound on σ_max that converges from below (exact to rounding once
    ``iterations`` reaches the state's size). A cell with ``jacobian_norms`` (a diagonal J) gives
    the exact norms itself, and ``iterations`` is not used.
    """
    B, T = u.shape[:2]
    steps = jacobian_batch_steps(B)
    # one stream of start vectors, drawn step by step: the same for any batching of the steps
    # (a later segment of the same sequence continues the stream it is given)
    if generator is None:
        generator = torch.Generator().manual_seed(JACOBIAN_SEED)
    norms = []
    for t0 in range(0, T, steps):  # row (t − t0)·B + b of a batch
        t1 = min(t0 + steps, T)
        z = tuple(torch.cat(parts).detach() for parts in zip(*previous_states[t0:t1]))
        u_rows = u.detach()[:, t0:t1].transpose(0, 1).reshape(-1, u.shape[-1])
        dt_rows = dt.detach()[:, t0:t1].transpose(0, 1).reshape(-1) if dt is not None else None
        if cell.jacobian_norms is not None:
            with torch.no_grad():
                norms.append(cell.jacobian_norms(u_rows, z, dt_rows))
            continue
        draws = [tuple(torch.randn(s.shape, generator=generator, dtype=s.dtype) for s in state)
                 for state in previous_states[t0:t1]]
        v = tuple(torch.cat(parts).to(z[0].device) for parts in zip(*draws))
        norms.append(lanczos_norms(cell, u_rows, z, dt_rows, v, iterations))
    return torch.cat(norms).reshape(T, B)


def lanczos_norms(cell: Cell, u: Tensor, z: tuple[Tensor, ...], dt: Tensor | None,
                  v: tuple[Tensor, ...], iterations: int) -> Tensor:
    """σ_max(J) per row, J = ∂step/∂z, by Lanczos on JᵀJ from ``v``: ``iterations`` products
    JᵀJ q (at most the state's size D) build, by the three-term recurrence, the tridiagonal
    matrix of JᵀJ in the Krylov basis, and σ_max² is its top eigenvalue
    (`top_tridiagonal_eigenvalue`).

    It converges from below, far faster than the power iteration on the same products (which
    reaches only (σ₂/σ₁)^(2·iterations)). The basis is not re-orthogonalised: rounding then makes
    copies of eigenvalues that have converged ("ghosts"), which leaves the top one where it is
    (Paige's analysis of the Lanczos process), and the step costs elementwise work only — a full
    re-orthogonalisation against every earlier vector cost more than the products themselves.
    A row whose Krylov space is exhausted (JᵀJ maps the basis into itself, e.g. an orthogonal J:
    one vector spans it) continues with 0, which adds only an eigenvalue 0.
    """
    products = normal_products(cell, u, z, dt)
    with torch.no_grad():
        q = torch.cat([p.flatten(1) for p in unit_rows(v)], 1)  # (N, D)
        D = q.shape[1]
        previous, beta = torch.zeros_like(q), q.new_zeros(q.shape[0], 1)
        tiny, eps = torch.finfo(q.dtype).tiny, torch.finfo(q.dtype).eps
        alphas, betas = [], []  # the tridiagonal's diagonal and off-diagonal, (N, 1) each
        for j in range(min(iterations, D)):
            r = products(q)  # JᵀJ q
            alpha = torch.linalg.vecdot(r, q).unsqueeze(1)
            alphas.append(alpha)
            if j == min(iterations, D) - 1:
                break
            if shares_memory(r, q, previous):  # a cell's product may hand back its argument
                r = r.clone()
            # r − α q − β q_prev and its normalisation in place: a third of the passes over
            # the (N, D) rows that out-of-place arithmetic and a masked division made
            r.addcmul_(alpha, q, value=-1).addcmul_(beta, previous, value=-1)
            norm = torch.linalg.vector_norm(r, dim=1, keepdim=True)
            # Breakdown: what is left is rounding noise, which normalising would turn into a
            # wrong direction; the row continues with 0.
            done = norm <= eps ** 0.5 * alpha.abs()
            beta = torch.where(done, torch.zeros_like(norm), norm)
            betas.append(beta)
            scale = torch.where(done, torch.zeros_like(norm), 1 / norm.clamp_min(tiny))
            previous, q = q, r.mul_(scale)
    diagonal = torch.cat(alphas, 1).double().cpu().numpy()
    off = (torch.cat(betas, 1).double().cpu().numpy() if betas
           else np.zeros((diagonal.shape[0], 0)))
    # The norms are returned in q's dtype: the eigenvalue to 2⁻³⁰ of itself is exact to
    # rounding there for float32 and narrower (half a float32 ulp is 2⁻²⁴), in fewer bisections.
    rtol = None if q.dtype == torch.float64 else 2.0 ** -30
    top = top_tridiagonal_eigenvalue(diagonal, off, rtol)
    return torch.from_numpy(np.sqrt(np.clip(top, 0, None))).to(device=q.device, dtype=q.dtype)


def shares_memory(r: Tensor, *others: Tensor) -> bool:
    storage = r.untyped_storage().data_ptr()
    return any(o.untyped_storage().data_ptr() == storage for o in others)


def normal_products(cell: Cell, u: Tensor, z: tuple[Tensor, ...], dt: Tensor | None):
    """q ↦ JᵀJ q per row, J = ∂step/∂z at (u, z), on rows of the flattened state (N, D): from
    the cell's `transition_jacobian` where it has one, else by autograd on one graph of
    ``cell.forward_mode_step``: Jᵀw by a vector-Jacobian product, Jv by differentiating
    w ↦ Jᵀw (linear in w) along v, so that any differentiable step works, torchdiffeq's
    solvers included."""
    if cell.transition_jacobian is not None:
        with torch.no_grad():
            matvec, rmatvec = cell.transition_jacobian(u, z, dt)
        return lambda q: rmatvec(matvec(q))
    z = tuple(s.detach().requires_grad_() for s in z)
    widths = [s[0].numel() for s in z]

    def split(flat: Tensor) -> tuple[Tensor, ...]:
        return tuple(p.reshape(s.shape) for p, s in zip(flat.split(widths, 1), z))

    with torch.enable_grad():
        out = tuple(cell.forward_mode_step(u, z, dt))
        w = tuple(torch.zeros_like(o, requires_grad=True) for o in out)
        vjp_of_w = torch.autograd.grad(out, z, w, create_graph=True, allow_unused=True)
        vjp_of_w = tuple(g if g is not None else torch.zeros_like(s) * w[0].sum()
                         for g, s in zip(vjp_of_w, z))

    def products(q: Tensor) -> Tensor:
        with torch.enable_grad():
            jv = torch.autograd.grad(vjp_of_w, w, split(q), retain_graph=True)
            grads = torch.autograd.grad(out, z, jv, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(s)).flatten(1)
                          for g, s in zip(grads, z)], 1)

    return products


def top_tridiagonal_eigenvalue(diagonal: np.ndarray, off: np.ndarray,
                               rtol: float | None = None) -> np.ndarray:
    """The largest eigenvalue of each symmetric tridiagonal matrix, (N, m) diagonal and (N, m−1)
    off-diagonal → (N,), by bisection on Sturm counts, to float64's rounding (or to ``rtol`` of
    itself).

    x is below the top eigenvalue exactly when some pivot of the LDLᵀ factorisation of T − xI
    is ≥ 0 (Sylvester's law of inertia). The bracket starts from the largest diagonal entry (a
    Rayleigh quotient, below the top) and Gershgorin's bound (above it). Vectorised over the N
    matrices, this is several times faster than a batched dense eigensolver on them; the
    pivots are made column by column into preallocated (m, N) rows, each column contiguous.
    """
    rtol = 4 * np.finfo(np.float64).eps if rtol is None else rtol
    d = np.ascontiguousarray(diagonal.T)  # (m, N)
    squared = np.ascontiguousarray((off * off).T)  # (m − 1, N)
    radius = np.zeros_like(d)
    radius[:-1] += np.abs(off.T)
    radius[1:] += np.abs(off.T)
    low, high = d.max(0), (d + radius).max(0)
    tiny = np.finfo(np.float64).tiny
    pivots, shifted, safe = np.empty_like(d), np.empty(d.shape[1]), np.empty(d.shape[1])
    for _ in range(200):  # each halves the bracket; it stops long before
        if np.all(high - low <= rtol * np.abs(high)):
            break
        x = (low + high) / 2
        np.subtract(d[0], x, out=pivots[0])
        for i in range(1, d.shape[0]):
            np.copyto(safe, pivots[i - 1])
            safe[safe == 0] = tiny
            np.divide(squared[i - 1], safe, out=safe)
            np.subtract(np.subtract(d[i], x, out=shifted), safe, out=pivots[i])
        above = (pivots >= 0).any(0)
        low, high = np.where(above, x, low), np.where(above, high, x)
    return high


def state_row_norms(parts: tuple[Tensor, ...]) -> Tensor:
    """The 2-norm of each row over a state's tensors together: (N, …) each → (N,) (for the
    Lanczos start vectors, O(1) by construction; `rnnlab.probing.row_norms` is the one that is
    exact at any magnitude, for the logged norms)."""
    return torch.stack([p.flatten(1).square().sum(1) for p in parts]).sum(0).sqrt()


def unit_rows(parts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    norms = state_row_norms(parts).clamp_min(torch.finfo(parts[0].dtype).tiny)
    return tuple(p / norms.view(-1, *([1] * (p.dim() - 1))) for p in parts)


def jacobians(model, batch: dict[str, Tensor], iterations: int) -> Jacobians:
    """The transition Jacobians of one batch, with the model's current weights (rnnlab's model).

    - ``jacobian_norm`` (T,): ||∂z_t/∂z_{t−1}||₂ as a map of the whole (B, state) tensor, i.e.
      the largest per-sequence spectral norm in the batch, so that
      ||∂L/∂z_{t−1}|| ≤ jacobian_norm[t]·||∂L/∂z_t|| wherever the loss is not read at t−1.
    - ``jacobian_rate``: mean log10 jacobian_norm[t] over t = 1 … T−1, the per-step rate that
      bound allows: log10_first_last ≤ (T−1)·jacobian_rate when the loss is read at T−1 only.

    The states come from one more pass of the model's loop in eval mode, a segment of
    `JACOBIAN_SEGMENTS` batches of timesteps at a time (`RecurrentModel.trajectory_segments`),
    so that one segment's states are held, not T: the same norms as from the whole trajectory.
    """
    dt = batch.get("dt")
    x = batch["x"]
    length = jacobian_batch_steps(x.shape[0]) * JACOBIAN_SEGMENTS  # whole batches of rows
    generator = torch.Generator().manual_seed(JACOBIAN_SEED)
    norms = [transition_jacobian_norms(model.cell, u, previous, part, iterations, generator)
             for _, u, part, previous in model.trajectory_segments(x, dt, length)]
    return jacobian_summary(torch.cat(norms).amax(1).double().cpu().numpy())


def jacobian_summary(jacobian_norm: np.ndarray) -> Jacobians:
    """``jacobian_norm`` (T,) and its ``jacobian_rate``, mean log10 over t = 1 … T−1."""
    with np.errstate(divide="ignore"):
        log = np.log10(jacobian_norm[1:])
    log = log[np.isfinite(log)]
    return Jacobians(jacobian_norm, float(log.mean()) if log.size else float("nan"))


def jacobian_bound(dL_dz: np.ndarray, jacobian_norm: np.ndarray) -> np.ndarray:
    """||dL/dz_{T−1}||·Π_{s=t+1}^{T−1} jacobian_norm[s], (T,): an upper bound on ||dL/dz_t||
    when the loss reads step T−1 only (then ∂L/∂z_{s−1} = J_sᵀ ∂L/∂z_s for every s)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(jacobian_norm, dtype=np.float64))
    after = np.concatenate([np.cumsum(logs[:0:-1])[::-1], [0.0]])  # Σ_{s>t} log ||J_s||
    with np.errstate(over="ignore"):  # beyond float64: inf, no bound worth the name
        return np.asarray(dL_dz, dtype=np.float64)[-1] * np.exp(after)


def recurrent_spectrum(cell: Cell) -> Spectrum | None:
    """Singular values, spectral norm and spectral radius of ``cell.recurrent_weight()``, for a
    cell that has one (the RNN's W)."""
    accessor = getattr(cell, "recurrent_weight", None)
    if accessor is None:
        return None
    W = accessor().detach().double().cpu()
    singular = torch.linalg.svdvals(W)
    return Spectrum(singular.numpy(), float(singular[0]),
                    float(torch.linalg.eigvals(W).abs().max()))


def grad_flow(model, batch: dict[str, Tensor], param_contributions: bool = False,
              jacobian_iterations: int = 0, lyapunov_k: int = 0, lyapunov_ons_every: int = 1,
              lyapunov_sequences: int | None = None) -> Record:
    """One batch's exact gradient flow through rnnlab's model, without touching the ``.grad`` of
    its parameters: the `Record` of the profiles (``dL_dz``, and ``dL_d<state>`` for every further
    state, e.g. ``dL_dc`` for the LSTM), the loss, ``grad_norm_<module>`` for encoder, cell and
    decoder and the summaries; with ``param_contributions`` also ``dL_dW_<module>`` (T,); with
    ``jacobian_iterations`` > 0 also the `jacobians` and the recurrent matrix's spectrum; with
    ``lyapunov_k`` > 0 also the top ``lyapunov_k`` Lyapunov exponents of the backward product
    over ``lyapunov_sequences`` of the batch's sequences (None: all), the predicted profile and
    ``predicted_decay_rate`` (`rnnlab.lyapunov.lyapunov`).
    """
    with model.probing(ProbeRequest(contributions=param_contributions)) as passes:
        loss = model.loss_fn(model(batch["x"], batch.get("dt")), batch["y"])
    (probed,) = passes
    leaves = probed.leaves()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*leaves, *(p for _, p in named)], allow_unused=True)
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    record = Record.from_pass(0, probed)
    record.loss = float(loss.detach())
    record.grad_norms = module_grad_norms(
        model, dict(zip((n for n, _ in named), grads[len(leaves):])))
    if jacobian_iterations:
        record.jacobians = jacobians(model, batch, jacobian_iterations)
        record.spectrum = recurrent_spectrum(model.cell)
    if lyapunov_k:
        record.lyapunov = lyapunov(model, batch, lyapunov_k, lyapunov_ons_every,
                                   lyapunov_sequences, last_norm=float(record.main_profile[-1]))
    return record
