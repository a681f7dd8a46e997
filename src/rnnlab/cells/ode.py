"""The neural ODE cell (Chen et al. 2018): dz/dt = g(h(t), z, w), one interval δt per step.

    z(t) = z(t − δt) + ∫ g(h(t), z(s), w) ds over [t − δt, t],   h(t) = Enc(x(t)) held constant

integrated by ``manual_euler`` (literally z(t) = z(t − δt) + g(h(t), z(t − δt), w)·δt) or by any
method of torchdiffeq, backpropagating through the solver or (``adjoint: true``) with the adjoint.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchdiffeq import odeint, odeint_adjoint

from rnnlab.cells.base import Cell, State
from rnnlab.config import is_number, require, require_choice, require_int

log = logging.getLogger(__name__)

# Every method of torchdiffeq 0.2.5. Fixed-grid methods take one step per interval (the Adams
# methods restart at every interval when stepping, so their first step, rk4, is all they take);
# adaptive methods take as many steps per interval as rtol/atol ask for.
FIXED_GRID = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
              "fixed_adams")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
SOLVERS = ("manual_euler", *FIXED_GRID, *ADAPTIVE)
# One odeint over the whole sequence reads a new input at every grid time. Multistep (Adams)
# methods would reuse g evaluated on earlier intervals' inputs, and SciPy's integrators cannot be
# told where the input jumps, so the whole-sequence path is for these methods only.
WHOLE_SEQUENCE_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "dopri5", "dopri8",
                          "bosh3", "fehlberg2", "adaptive_heun")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU,
               "elu": nn.ELU, "sigmoid": nn.Sigmoid}


def is_positive_number(value) -> bool:
    return is_number(value) and value > 0


def interval(grid: Tensor, tau: Tensor) -> int:
    """The interval k of the integer grid 0 … T that holds time τ ∈ [k, k+1), by comparing τ with
    the grid (never by dividing a float time); clamped to 0 … T−1."""
    k = int(torch.searchsorted(grid, tau.detach().reshape(1).to(grid.dtype), right=True))
    return min(max(k - 1, 0), len(grid) - 2)


class CompactGradient(torch.autograd.Function):
    """Identity whose backward copies the incoming gradient.

    `odeint_adjoint` returns each adjoint parameter's gradient as a view into one flat tensor
    holding the whole augmented state (z, a, every parameter's gradient). An input's gradient
    waits for all T steps before it moves on, and each view would keep its whole flat tensor
    alive meanwhile: measured at T = 1000 (B = 64, hidden 64, euler), a peak of 216 MiB instead
    of 45 MiB. A compact copy frees it at once.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone()


class Dynamics(nn.Module):
    """g(h, z; w) = MLP([h, z]): ``depth`` hidden layers of ``width`` units, linear output.

    h: (B, input_size), z: (B, hidden_size) → dz/dt: (B, hidden_size).
    """

    def __init__(self, input_size: int, hidden_size: int, width: int, depth: int, activation: str):
        super().__init__()
        layers: list[nn.Module] = []
        size = input_size + hidden_size
        for _ in range(depth):
            layers += [nn.Linear(size, width), ACTIVATIONS[activation]()]
            size = width
        layers.append(nn.Linear(size, hidden_size))
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([h, z], dim=-1))


class NeuralODE(Cell):
    """dz/dt = g(h(t), z, w) over one interval of length δt per step; state (z,) named ``h``.

    Time inside an interval is measured in its own units, s = (t − t_{k})/δt ∈ [0, 1], and the
    solver integrates dz/ds = δt·g(h_k, z): the same solution, and a per-sample δt (a (B,) tensor
    of time gaps from the task) is a plain factor, δt_b·g.

    - ``solver=manual_euler``: z_k = z_{k−1} + g(h_k, z_{k−1}, w)·δt, one evaluation of g a step.
      ``solver=euler`` gives the same numbers through torchdiffeq.
    - any other ``solver`` is a torchdiffeq method (`SOLVERS`); ``rtol``/``atol`` set the adaptive
      methods' (and implicit_adams') tolerances. ``scipy_solver`` needs ``adjoint: true``.
    - ``adjoint: true`` backpropagates with `odeint_adjoint`: the gradient of the continuous ODE,
      found by integrating the adjoint backwards with the same method, keeping per interval only
      its two end states instead of every stage's activations. It is not the exact gradient of
      the discrete scheme; the two differ by O(δt).
    - ``whole_sequence: true`` gives `sequence`: one odeint over all T intervals (time τ = t/δt on
      the integer grid 0 … T, h_k looked up by interval index k), used on unmonitored steps.
      ``auto`` (the default) takes it for the fixed-grid methods, where it is the same model and
      saves odeint's per-call overhead (measured, B = 64, H = 128, T = 1000, euler: 0.79 s a step
      against 1.10 s interval by interval, manual Euler 0.65 s). Fixed-grid single-step methods
      match stepping to float rounding; adaptive methods (``true`` only) keep their step size
      across intervals and match to their tolerance. Only for `WHOLE_SEQUENCE_SOLVERS`.
      The model takes it through `sequence_from_inputs`, which stacks only the states it reads.
    - With the adjoint, the whole-sequence path is `sequence_from_inputs`:
      `odeint_adjoint` over segments of ``adjoint_segment`` intervals with the encoder inside g,
      keeping the two end states of each segment where stepping keeps the end states and the
      input of every interval (measured, euler, H = 128, T = 10,000: 10 MiB against 765 MiB).
      Its backward reconstructs z backwards from each segment's end instead of from every z_k,
      so its gradients differ from stepping's adjoint, which monitored steps use (the probes
      sit between intervals), by the solver's error over one segment (segments of one
      interval: identical). ``adjoint_segment=0`` takes one segment: memory flat in T, but a
      reconstruction that drifts over long sequences (87% at T = 10,000, euler). Adaptive
      methods (``whole_sequence: true``) end a step on every grid time in both directions and
      agree with stepping's adjoint to their tolerance.

    The model probes z at every grid time t_k, so ``dL_dz`` is exact for every solver.
    `diagnostics` reports the number of evaluations of g (NFE) per training step.
    """

    def __init__(self, input_size: int, hidden_size: int = 64, width: int = 64, depth: int = 2,
                 activation: str = "tanh", dt: float = 0.1, solver: str = "manual_euler",
                 rtol: float = 1e-4, atol: float = 1e-6, adjoint: bool = False,
                 whole_sequence: bool | str = "auto", adjoint_segment: int = 100):
        super().__init__(input_size, hidden_size)
        require_int("cell.width", width)
        require_int("cell.depth", depth)
        require_choice("cell.activation", activation, tuple(ACTIVATIONS))
        require(is_positive_number(dt), "cell.dt", dt, "a finite number > 0")
        self.solver = require_choice("cell.solver", solver, SOLVERS)
        require(is_positive_number(rtol), "cell.rtol", rtol, "a finite number > 0")
        require(is_positive_number(atol), "cell.atol", atol, "a finite number > 0")
        require(isinstance(adjoint, bool), "cell.adjoint", adjoint, "true or false")
        require(isinstance(whole_sequence, bool) or whole_sequence == "auto",
                "cell.whole_sequence", whole_sequence, "auto, true or false")
        require_int("cell.adjoint_segment", adjoint_segment, minimum=0)
        if whole_sequence == "auto":  # where it is the same model, and faster (class docs)
            whole_sequence = solver in FIXED_GRID and solver in WHOLE_SEQUENCE_SOLVERS
        require(not (adjoint and solver == "manual_euler"), "cell.adjoint", adjoint,
                "false with cell.solver=manual_euler (the adjoint needs a torchdiffeq solver)")
        require(adjoint or solver != "scipy_solver", "cell.adjoint", adjoint,
                "true with cell.solver=scipy_solver (SciPy's integrators pass no gradient back)")
        require(not whole_sequence or solver in WHOLE_SEQUENCE_SOLVERS, "cell.whole_sequence",
                whole_sequence, f"false with cell.solver={solver} (the whole-sequence path "
                "takes " + ", ".join(WHOLE_SEQUENCE_SOLVERS) + ")")
        self.g = Dynamics(input_size, hidden_size, width, depth, activation)
        self.dt, self.rtol, self.atol = float(dt), float(rtol), float(atol)
        self.adjoint, self.whole_sequence = adjoint, whole_sequence
        self.adjoint_segment = adjoint_segment
        self.nfe = 0  # evaluations of g for training since the last `diagnostics()` …
        self.nfe_forward = 0  # … of which in forward passes (the rest: the adjoint's backward)
        if adjoint:
            log.warning("cell.adjoint=true: gradients, and the logged dL_dz, are those of the "
                        "continuous ODE (adjoint integrated backwards with %s), not the exact "
                        "gradients of the discrete scheme; they differ by O(dt)", solver)

    # --- the dynamics --------------------------------------------------------------------------
    def rate(self, h: Tensor, z: Tensor, scale: float | Tensor,
             weights: dict[str, Tensor] | None = None) -> Tensor:
        """dz/ds = δt·g(h, z): s in units of the interval; ``scale`` δt, a float or (B, 1);
        ``weights``: g's parameters to use instead of its own."""
        if self.training:
            self.nfe += 1
        return scale * (self.g(h, z) if weights is None else
                        functional_call(self.g, weights, (h, z)))

    def solver_options(self, grid: Tensor) -> dict:
        """Options that end a solver step exactly on every grid time after the first.

        Fixed-grid methods step from grid time to grid time by themselves. Adaptive methods stop
        at each interior grid time (``jump_t``: the input may jump there) and end a step on the
        last (``step_t``); otherwise torchdiffeq interpolates the output within an overshooting
        step, with an error its tolerances do not control (measured 1e-6 for bosh3 at rtol
        1e-9).
        """
        if self.solver in FIXED_GRID or self.solver == "scipy_solver":
            return {}
        return {"jump_t": grid[1:-1], "step_t": grid[-1:]}

    # --- the Cell contract ---------------------------------------------------------------------
    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        return self.integrate(u_t, state, dt, adjoint=self.adjoint)

    def forward_mode_step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        """`step` without the adjoint, which torch.func cannot trace: the same map (the adjoint
        changes only how gradients are found). Its evaluations of g are not counted as NFE."""
        counts = self.nfe, self.nfe_forward
        try:
            return self.integrate(u_t, state, dt, adjoint=False)
        finally:
            self.nfe, self.nfe_forward = counts

    def integrate(self, u_t: Tensor, state: State, dt: Tensor | None, adjoint: bool) -> State:
        """z_{t-1} → z_t over one interval, backpropagating directly or with the adjoint."""
        (z,) = state
        scale = self.dt if dt is None else dt.to(z.dtype).unsqueeze(-1)
        before = self.nfe
        if self.solver == "manual_euler":
            z_next = z + self.rate(u_t, z, scale)
        else:
            unit = torch.tensor([0.0, 1.0], dtype=z.dtype, device=z.device)
            kwargs = {"method": self.solver, "rtol": self.rtol, "atol": self.atol,
                      "options": self.solver_options(unit)}
            if adjoint:
                # odeint_adjoint sends gradients only to its adjoint_params: h_k must be one of
                # them, or the encoder would get no gradient.
                u_t = CompactGradient.apply(u_t)
                # The adjoint's backward evaluates g again after this step has returned, so it
                # gets the weights in use now: under the monitor's per-step parameter probes
                # (`torch.func.functional_call`) they are W + q_t, not g's own W.
                weights = dict(self.g.named_parameters())
                params = (u_t, *([scale] if torch.is_tensor(scale) else []), *weights.values())
                z_next = odeint_adjoint(lambda s, y: self.rate(u_t, y, scale, weights), z, unit,
                                        adjoint_params=params, **kwargs)[-1]
            else:
                z_next = odeint(lambda s, y: self.rate(u_t, y, scale), z, unit, **kwargs)[-1]
        self.nfe_forward += self.nfe - before
        return (z_next,)

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State] | None:
        """One odeint over the T intervals of u: (B, T, input) → outputs (B, T, hidden)."""
        if not self.whole_sequence or self.adjoint:  # the adjoint: `sequence_from_inputs`
            return None
        path, end = self.integrate_sequence(u, state, n_out=u.shape[1])
        return path, (end,)

    def integrate_sequence(self, u: Tensor, state: State, n_out: int) -> tuple[Tensor, Tensor]:
        """One odeint over the T intervals of u: (B, T, input) → z at the last ``n_out`` grid
        times (B, n_out, hidden), and z_T.

        torchdiffeq writes each requested output into one preallocated tensor, which makes plain
        backprop quadratic in T (docs/architecture.md, "Speed"); so only [0, T] is requested, and
        the states at the
        grid times are collected by the solver's step callbacks as it reaches them.
        """
        (z0,) = state
        T = u.shape[1]
        # Time τ = t/δt on the integer grid 0 … T: interval k is [k, k+1].
        grid = torch.arange(T + 1, dtype=z0.dtype, device=z0.device)
        inputs = u.unbind(1)  # split once: slicing u inside g would make backward quadratic in T
        # z at grid times T − n_out + 1 … T − 1, in order: only the states that are returned are
        # kept (the graph does not hold z itself; keeping every z_k cost (B, hidden) a step).
        first_kept, reached, states = T - n_out + 1, 0, []
        options = self.solver_options(grid)

        def reach(y0: Tensor) -> None:
            nonlocal reached
            if reached >= first_kept:
                states.append(y0)
            reached += 1

        if self.solver in FIXED_GRID:
            # One solver step per interval, announced by callback_step before its stages: the
            # interval is the number of steps begun, and every stage (rk4's last, on t_{k+1},
            # too) reads that interval's input, with no lookup by time (nor a device sync).
            def f(tau: Tensor, z: Tensor) -> Tensor:
                return self.rate(inputs[reached - 1], z, self.dt)

            f.callback_step = lambda t0, y0, dt: reach(y0)
            options["grid_constructor"] = lambda func, y0, t: grid
        else:
            # Steps of any size: the interval is found by comparing τ with the grid, never by
            # dividing a float time; the solver stops on every grid time (`solver_options`).
            def f(tau: Tensor, z: Tensor) -> Tensor:
                return self.rate(inputs[interval(grid, tau)], z, self.dt)

            def on_accepted_step(t0: Tensor, y0: Tensor, dt: Tensor) -> None:
                if reached < T and t0 == grid[reached]:
                    reach(y0)

            f.callback_accept_step = on_accepted_step
        before = self.nfe
        end = odeint(f, z0, grid[[0, -1]], method=self.solver, rtol=self.rtol, atol=self.atol,
                     options=options)[-1]
        self.nfe_forward += self.nfe - before
        return torch.stack([*states, end], dim=1), end

    def sequence_from_inputs(self, x: Tensor, encoder: nn.Module, state: State,
                             n_out: int) -> Tensor | None:
        """z on the last ``n_out`` grid times (B, n_out, hidden) from the raw inputs x.

        Without the adjoint: `integrate_sequence` over encoder(x), stacking only the states
        that are read (stacking all T and slicing cost a (B, T, hidden) copy forward and a
        zero gradient of that size backward: 5% of a step, euler at T = 1000).

        With the adjoint: `odeint_adjoint` over the T intervals in segments of
        ``adjoint_segment`` intervals, h_k = encoder(x_k) evaluated inside g.
        The adjoint parameters are the encoder's and g's, never the encoded sequence: the
        backward then carries O(parameters) per evaluation instead of a (B, T, input) gradient
        of every h_k (O(T²) in all). Each segment keeps only the states at its ends (and at the
        read times in it); its backward reconstructs z backwards from its own end, so the
        reconstruction's error grows over one segment, not over the whole sequence. Memory:
        one (B, hidden) state per segment, ``adjoint_segment=0`` (one segment) flat in T.
        The fixed grid is the integer one (step 1 in τ = t/δt); ``perturb`` keeps each stage
        on its own interval's input in both directions. Adaptive methods end a step on every
        grid time (`solver_options`; torchdiffeq flips them for the backward pass).
        """
        if not self.whole_sequence:
            return None
        if not self.adjoint:
            return self.integrate_sequence(encoder(x), state, n_out)[0]
        (z,) = state
        T = x.shape[1]
        grid = torch.arange(T + 1, dtype=z.dtype, device=z.device)

        def rate_within(start: int, end: int):
            """g on the segment [start, end]: its end belongs to its last interval, in both
            directions (an adaptive step ends there without a perturbed evaluation)."""
            def f(tau: Tensor, z: Tensor) -> Tensor:
                # x indexed per evaluation: x.unbind(1) would hold T tensors (~1 KiB each)
                k = min(max(interval(grid, tau), start), end - 1)
                return self.rate(encoder(x[:, k]), z, self.dt)
            return f

        params = (*encoder.parameters(), *self.g.parameters())
        first_read = T - n_out + 1  # z is read at grid times first_read … T
        segment = self.adjoint_segment or T
        before = self.nfe
        outputs = []
        for start in range(0, T, segment):
            end = min(start + segment, T)
            reads = range(max(start + 1, first_read), end + 1)
            times = grid[[start, *reads]] if reads else grid[[start, end]]
            # Fixed grid: one step per interval, its last stage perturbed onto the interval's
            # input; adaptive: a step ends on every grid time, the input jumping there, in the
            # forward and (torchdiffeq flips the times) the adjoint's backward pass.
            options = ({"perturb": True, "step_size": 1.0} if self.solver in FIXED_GRID else
                       self.solver_options(grid[start:end + 1]))
            path = odeint_adjoint(rate_within(start, end), z, times, method=self.solver,
                                  rtol=self.rtol, atol=self.atol, adjoint_params=params,
                                  options=options)
            outputs.append(path[1:] if reads else path[:0])
            z = path[-1]
        self.nfe_forward += self.nfe - before
        return torch.cat(outputs).transpose(0, 1)

    def diagnostics(self) -> dict[str, float]:
        """Evaluations of g since the last call, counted in training mode: ``nfe_forward`` in
        forward passes, ``nfe_backward`` in the adjoint's backward passes (0 without it)."""
        counts = {"nfe_forward": float(self.nfe_forward),
                  "nfe_backward": float(self.nfe - self.nfe_forward)}
        self.nfe = self.nfe_forward = 0
        return counts
