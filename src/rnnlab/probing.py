"""The boundary between a model and the gradient-flow instrument: one probed forward pass.

A probed pass adds a zero probe p_t to every recurrent state as it is made, z_t ← z_t + p_t, and,
when asked, a zero q_t to every shared parameter at every step, W⁽ᵗ⁾ = W + q_t. The values are
unchanged; after the backward pass p_t.grad = ∂L/∂z_t (the total derivative through every later
step) and q_t.grad = dL/dW⁽ᵗ⁾, whose sum over t is dL/dW (docs/architecture.md, "The science").

- `ProbeRequest` is what the instrument asks of a pass: the profiles of the states always, the
  per-step parameter contributions when ``contributions`` is set (models that offer them).
- `ProbedPass` is what a pass leaves behind: its probes, grouped by profile key. After the backward
  pass, `ProbedPass.profiles` and `ProbedPass.contributions` turn their gradients into float64 norms
  per timestep.
- A module that probes itself (rnnlab's `RecurrentModel`) implements `SelfProbing`: inside
  ``module.probing(request)`` every forward pass runs its probed path and appends its `ProbedPass`
  to the list the context yields. `rnnlab.watching` gives torch.nn's recurrent modules the same
  contract from outside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

# Sums a tensor over the processes of a data-parallel run (None: a single process); it may
# overwrite the tensor it is given with the sum.
Reduce = Callable[[Tensor], Tensor] | None

# A float64 norm computed as √(Σ x²) loses digits below ~1e-154 (x² is subnormal) and is 0 below
# ~1e-162, and overflows above ~1e154; norms outside these bounds are recomputed with the row
# scaled by its largest entry. Entries of any narrower dtype square within float64's range.
SQUARE_SAFE = (1e-140, 1e140)


# Rows of a narrower dtype are copied to float64 a block of at most this many values at a time.
ROW_NORM_BLOCK_VALUES = 2**20
# On the CPU, into one buffer per thread, reused (`float64_copy`).
SCRATCH = threading.local()


def row_norms(rows: Tensor) -> Tensor:
    """‖row‖₂ of every row of a 2-D tensor, (rows,) float64, accumulated in float64, and exact
    for float64 entries at any magnitude float64 holds (`SQUARE_SAFE`: those rows are divided by
    their largest |entry| before squaring, and multiplied back).

    Rows of a narrower dtype are copied to float64 in blocks of `ROW_NORM_BLOCK_VALUES` values
    and their norms taken there: the same numbers as ``vector_norm(…, dtype=torch.float64)``,
    which took up to 12× longer on this package's benchmark CPU (1.5 against 1.2 ms for 100
    rows of 128 × 128, 6.1 against 2.4 for 50 rows of 512 × 128, 31.5 against 2.5 for 1000
    rows of 64 × 128)."""
    if rows.dtype != torch.float64:
        span = max(1, ROW_NORM_BLOCK_VALUES // max(1, rows.shape[1]))
        blocks = [torch.linalg.vector_norm(float64_copy(block), dim=1)
                  for block in rows.split(span)]
        return torch.cat(blocks) if blocks else rows.new_zeros(0, dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1)
    outside = (norms < SQUARE_SAFE[0]) | (norms > SQUARE_SAFE[1])
    if bool(outside.any()):
        sub = rows[outside]
        scale = sub.abs().amax(1)
        usable = (scale > 0) & torch.isfinite(scale)  # zero, non-finite rows: as they are
        unit = torch.where(usable, scale, torch.ones_like(scale))
        scaled = torch.linalg.vector_norm(sub / unit[:, None], dim=1) * unit
        norms[outside] = torch.where(usable, scaled, norms[outside])
    return norms


def float64_copy(block: Tensor) -> Tensor:
    """``block.double()``, on the CPU into a buffer of this thread reused from call to call (the
    result is valid until the next call). A fresh 8 MB copy per block grew the resident memory by
    its size at every call: glibc served the small allocations in between from the freed copy,
    so the next copy no longer fitted there and came from the top of the heap (a profile of
    T = 10,000 in 100 chunk leaves: +556 MB during its norms; measured with /proc/self/statm)."""
    if block.device.type != "cpu":
        return block.double()
    buffer = getattr(SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < block.numel():
        buffer = SCRATCH.buffer = torch.empty(max(block.numel(), ROW_NORM_BLOCK_VALUES),
                                              dtype=torch.float64)
    return buffer[:block.numel()].view(block.shape).copy_(block)


def norms_over_processes(norms: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """√(Σ_r n_r²) over the processes of each process's norms n_r (T,), float64, without
    squaring a norm below float64's square range: each is first divided by s = Σ_r n_r (the same
    on every process), so the squares summed are of numbers in [0, 1]. ``reduce`` may sum in
    place (Lightning's strategies do): it is given copies."""
    total = reduce(norms.clone())
    unit = torch.where(total > 0, total, torch.ones_like(total))
    return reduce((norms / unit).square()).sqrt() * unit


@dataclass(frozen=True)
class ProbeRequest:
    """What a probed pass measures: state profiles, and with ``contributions`` also dL/dW⁽ᵗ⁾.
    ``stream``: where no contributions read the state probes' gradients, keep only their norms,
    taken as each arrives (`StateProbes.stream`); False keeps the gradients."""

    contributions: bool = False
    stream: bool = True


@dataclass
class StateProbes:
    """The probes of one state (one layer and direction of a torch.nn module): zero leaves whose
    rows, concatenated along dim 0, are T blocks of ``sizes[t]`` rows, block t added to z_t.

    Four layouts fit: one (T, B, H) leaf with sizes (1, …, 1), or its chunks (C_i, B, H) with
    Σ C_i = T; one (Σ n_t, H) leaf of a packed batch with sizes n_t; or T leaves (B, H), one per
    step, with sizes (B, …, B).
    """

    leaves: list[Tensor]
    sizes: list[int]
    # with `stream`: leaf index → its rows' norms, taken when its gradient arrived
    streamed: dict[int, Tensor] | None = None

    def stream(self) -> None:
        """Take each leaf's rows' norms as soon as the backward pass accumulates its gradient,
        and drop the gradient: the probes' gradients (T × B × state values) are then never all
        held at once. For the chunk layout (sizes all 1), where nothing else reads them (no
        per-step contributions). A leaf's gradient arriving twice (a second backward pass
        through the same probes) is refused: its norms would be of the second part alone."""
        if self.sizes != [1] * len(self.sizes) or sum(
                leaf.shape[0] for leaf in self.leaves) != len(self.sizes):
            raise ValueError("streamed probes need the chunk layout: leaves (C_i, …) with "
                             "Σ C_i = T, sizes all 1")
        self.streamed = {}
        for i, leaf in enumerate(self.leaves):
            leaf.register_post_accumulate_grad_hook(partial(self.take, i))

    def take(self, index: int, leaf: Tensor) -> None:
        if index in self.streamed:
            raise RuntimeError("a streamed probe received a second gradient; its profile would "
                               "be of the last backward pass alone (stream probes only for "
                               "one backward pass)")
        self.streamed[index] = row_norms(leaf.grad.detach().reshape(leaf.shape[0], -1))
        leaf.grad = None

    def norms(self, reduce: Reduce = None, world_size: int = 1) -> np.ndarray:
        """||∂L/∂z_t|| for t = 0 … T−1, (T,) float64, from the leaves' gradients (none: 0).

        Under data parallelism each of the R processes holds ∂L_r/∂z_t for its share of the
        batch, and the global batch-mean loss is L = (1/R) Σ_r L_r; so the norm over the global
        batch is √(Σ_r ||∂L_r/∂z_t||²) / R, summed with ``reduce`` (`norms_over_processes`).
        Exact at any magnitude float64 holds (`row_norms`).
        """
        T = len(self.sizes)
        streamed = self.streamed or {}
        grads = [None if i in streamed else
                 (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).detach()
                 for i, leaf in enumerate(self.leaves)]
        if self.streamed is not None or (all(n == 1 for n in self.sizes)
                                         and sum(g.shape[0] for g in grads) == T):
            # one (T, B, H) leaf, or its chunks (C, B, H): row t of them step t, the norms
            # without an index; streamed, a leaf's norms as they were taken (one whose
            # gradient autograd.grad set ran no hook: its gradient's)
            norms = torch.cat([streamed[i] if g is None else row_norms(g.reshape(g.shape[0], -1))
                               for i, g in enumerate(grads)])
        else:
            # A leaf per timestep holds that step's rows (one row if it has no batch
            # dimension); a single leaf holds them all. Each row's norm, then per step the
            # norm of its rows' norms (`grouped_norms`).
            counts = self.sizes if len(grads) == T else [sum(self.sizes)]
            rows = torch.cat([row_norms(g.reshape(n, -1)) for g, n in zip(grads, counts)])
            index = torch.repeat_interleave(torch.arange(T, device=rows.device),
                                            torch.tensor(self.sizes, device=rows.device))
            norms = grouped_norms(rows, index, T)
        if reduce is not None:
            norms = norms_over_processes(norms, reduce)
        return (norms / world_size).cpu().numpy()


@dataclass
class ProbedPass:
    """The probes of one forward pass of one module.

    ``states``: profile key (``dL_dz``, ``dL_dc``, ``dL_dh``) → one `StateProbes` per row (a layer
    and direction of a torch.nn module; one row for a cell). ``rows``: the rows' names, or None
    for a single unnamed row (the profiles are then (T,) instead of (rows, T)). ``params``: module
    → parameter name → its (T, *shape) zero probe q_t, when contributions were requested.
    """

    states: dict[str, list[StateProbes]]
    rows: tuple[str, ...] | None = None
    params: dict[str, dict[str, Tensor]] | None = None
    # module → a function that, after the backward pass, yields its dL/dW⁽ᵗ⁾ chunk by chunk of
    # steps: per chunk a list of (C, *shape) gradients, one per parameter (memory of C steps).
    streamed: dict[str, Callable[[], Iterator[list[Tensor]]]] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # what a module passes on to its instruments

    def leaves(self) -> list[Tensor]:
        """Every probe tensor: what a backward pass must reach (``loss.backward(inputs=…)``)."""
        leaves = [leaf for group in self.states.values() for probes in group
                  for leaf in probes.leaves]
        return leaves + [q for qs in (self.params or {}).values() for q in qs.values()]

    def profiles(self, reduce: Reduce = None, world_size: int = 1) -> dict[str, np.ndarray]:
        """Key → ||∂L/∂z_t||, (T,) float64, or (rows, T) when the rows are named."""
        profiles = {}
        for key, group in self.states.items():
            rows = np.stack([probes.norms(reduce, world_size) for probes in group])
            profiles[key] = rows if self.rows is not None else rows[0]
        return profiles

    def contributions(self, reduce: Reduce = None, world_size: int = 1) -> dict[str, np.ndarray]:
        """``dL_dW_<module>`` (T,) float64: ||dL/dW⁽ᵗ⁾|| over all the module's parameters at t.

        Under data parallelism the per-process contributions are summed with ``reduce`` and
        divided by R before the norm (L = (1/R) Σ_r L_r).
        """
        contributions = {}
        for module, probes in (self.params or {}).items():
            T = next(iter(probes.values())).shape[0] if probes else 0
            norms = [step_norms(q.grad, reduce, world_size) for q in probes.values()
                     if q.grad is not None]  # a parameter the loss does not reach: 0
            contributions[f"dL_dW_{module}"] = (
                combined_norms(norms) if norms else torch.zeros(T, dtype=torch.float64)
            ).cpu().numpy()
        for module, chunks in self.streamed.items():
            norms = torch.cat([combined_norms([step_norms(g, reduce, world_size) for g in grads])
                               for grads in chunks()])
            contributions[f"dL_dW_{module}"] = norms.cpu().numpy()
        return contributions


def step_norms(grad: Tensor, reduce: Reduce = None, world_size: int = 1) -> Tensor:
    """‖dL/dW⁽ᵗ⁾‖ over a parameter's entries, per step: (T, *shape) → (T,) float64 (`row_norms`);
    under data parallelism of the gradient summed over processes and divided by R."""
    if reduce is None:
        return row_norms(grad.detach().flatten(1))
    return row_norms((reduce(grad.detach().double()) / world_size).flatten(1))


def combined_norms(norms: list[Tensor]) -> Tensor:
    """√(Σ_i n_i²) of several (T,) float64 norms, step by step (`grouped_norms`)."""
    T = norms[0].shape[0]
    index = torch.arange(T, device=norms[0].device).repeat(len(norms))
    return grouped_norms(torch.cat(norms), index, T)


def grouped_norms(norms: Tensor, index: Tensor, groups: int) -> Tensor:
    """√(Σ n²) over the float64 norms of each group, (N,) with their group ``index`` (N,) →
    (groups,): each group's norms divided by their largest before squaring (exact where the
    squares would leave float64's range); non-finite where one of them is, 0 for none."""
    largest = torch.zeros(groups, dtype=torch.float64, device=norms.device)
    largest.scatter_reduce_(0, index, norms, reduce="amax")
    unit = torch.where((largest > 0) & torch.isfinite(largest), largest,
                       torch.ones_like(largest))
    squares = torch.zeros(groups, dtype=torch.float64, device=norms.device)
    squares.index_add_(0, index, (norms / unit[index]).square())
    return torch.where(torch.isfinite(largest), squares.sqrt() * unit, largest)


@runtime_checkable
class SelfProbing(Protocol):
    """A module with a probed path of its own (rnnlab's `RecurrentModel`)."""

    def probing(self, request: ProbeRequest) -> AbstractContextManager[list[ProbedPass]]:
        """Inside the context every forward pass runs the probed path and appends its pass."""
        ...


def zero_probe(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A zero probe leaf of ``shape`` (``like``'s dtype and device): one stored zero, expanded,
    so the T·B·H zeros it reads as take no memory (only its gradient, which the backward pass
    makes dense, does)."""
    return like.new_zeros(()).expand(shape).requires_grad_()


def probe_leaves_like(states: tuple[Tensor, ...], seq_len: int) -> list[Tensor]:
    """Zero probes, one (T, *state shape) leaf per state, to be added as z_t ← z_t + p_t."""
    return [zero_probe((seq_len, *s.shape), s) for s in states]


def timesteps_of(leaves: list[Tensor]) -> Iterator[tuple[Tensor, ...]]:
    """Per timestep, the probe of every state: split once (indexing p[t] in a loop would make the
    backward quadratic in T)."""
    return zip(*(leaf.unbind(0) for leaf in leaves))
