"""The gradient-flow record of one monitored step: its fields, its summaries, its file.

A `Record` holds what the instruments measured on one training step of one watched module, one
field per instrument:

    field          keys in the file                              what
    -------------  --------------------------------------------  ---------------------------------
    profiles       dL_dz (T,), dL_d<state> (T,);                 ‖∂L/∂z_t‖ per state
                   dL_dh, dL_dc (rows, T) of torch.nn modules
    rows           rows (rows,) str                              the rows' names: l0, l0_reverse…
    summary        log10_first_last, decay_rate, horizon         of the first profile (derived)
    loss           loss                                          the batch-mean training loss
    grad_norms     grad_norm_<module>, grad_norm_total,          2-norms of parameter gradients
                   grad_norm_total_clipped
    contributions  dL_dW_<module> (T,)                           ‖dL/dW⁽ᵗ⁾‖ per module
    jacobians      jacobian_norm (T,), jacobian_rate             `Jacobians`
    spectrum       recurrent_singular_values (H,), recurrent_    `Spectrum`
                   spectral_norm, recurrent_spectral_radius
    lyapunov       lyapunov (k,), lyapunov_per_sequence (S, k),  `Lyapunov`
                   lyapunov_prediction (T,), predicted_decay_rate

A file is ``<directory>/step_<step:07d>.npz``: float64 arrays (scalars 0-d), with ``step`` and
``T``. A new instrument is a `Section` subclass (its keys, its logged scalars) and one field of
`Record` typed with it; writing, reading, logging and `load`'s stacking follow from the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import UnionType
from typing import ClassVar

import numpy as np

from rnnlab.rundir import GRAD_FLOW

HORIZON_THRESHOLD = 1e-3
RECORD_GLOB = "step_*.npz"


class Section:
    """An instrument's part of a record: a dataclass of float64 arrays and floats.

    Subclasses are dataclasses whose field names are their keys in the file; `scalars` names the
    tags a logger gets, `per_timestep` the (T,) arrays whose chosen timesteps are logged.
    """

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name), dtype=np.float64)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Section | None:
        """The section held in a file's arrays, or None when the step did not measure it (a
        field missing, or NaN where `load` stacked records that lack it)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not all(n in arrays for n in names):
            return None
        values = {n: np.asarray(arrays[n]) for n in names}
        if all(np.isnan(v).all() for v in values.values()):
            return None
        return cls(**{n: float(v) if v.ndim == 0 else v for n, v in values.items()})

    def scalars(self) -> dict[str, float]:
        return {}

    def per_timestep(self) -> dict[str, np.ndarray]:
        return {}


@dataclass
class Jacobians(Section):
    """``jacobian_norm`` (T,): ‖∂z_t/∂z_{t−1}‖₂, the largest per-sequence spectral norm in the
    batch; ``jacobian_rate``: mean log10 jacobian_norm[t] over t = 1 … T−1."""

    jacobian_norm: np.ndarray
    jacobian_rate: float

    def scalars(self) -> dict[str, float]:
        return {"grad_flow/jacobian_rate": self.jacobian_rate}

    def per_timestep(self) -> dict[str, np.ndarray]:
        return {"jacobian_norm": self.jacobian_norm}


@dataclass
class Spectrum(Section):
    """The recurrent matrix W of a cell that has one: singular values (descending), ‖W‖₂, and
    the spectral radius max |λ(W)|."""

    recurrent_singular_values: np.ndarray
    recurrent_spectral_norm: float
    recurrent_spectral_radius: float

    def scalars(self) -> dict[str, float]:
        return {"recurrent/spectral_norm": self.recurrent_spectral_norm,
                "recurrent/spectral_radius": self.recurrent_spectral_radius}


@dataclass
class Lyapunov(Section):
    """The Lyapunov spectrum of the backward product J_{t+1}ᵀ … J_{T−1}ᵀ (`rnnlab.lyapunov`):
    ``lyapunov`` (k,) the batch mean of ``lyapunov_per_sequence`` (S, k), log10 per step,
    descending; ``lyapunov_prediction`` (T,) the profile it predicts and
    ``predicted_decay_rate`` that profile's decay rate, fitted as ``decay_rate`` is."""

    lyapunov: np.ndarray
    lyapunov_per_sequence: np.ndarray
    lyapunov_prediction: np.ndarray
    predicted_decay_rate: float

    def scalars(self) -> dict[str, float]:
        exponents = {f"lyapunov/lambda_{i}": float(v)
                     for i, v in enumerate(np.ravel(self.lyapunov), start=1)}
        return {"grad_flow/predicted_decay_rate": self.predicted_decay_rate, **exponents}


@dataclass
class Summary(Section):
    """Summary scalars of a profile (T,); arrays (rows,) for a profile of several rows.

    - ``log10_first_last``: log10 ‖dL/dz_0‖ / ‖dL/dz_{T−1}‖ (< 0: vanishing, > 0: exploding).
    - ``decay_rate``: least-squares slope of log10 ‖dL/dz_t‖ against the number of steps back
      from the end, T−1−t; log10(gain) for the linear orthogonal RNN. < 0 vanishes, > 0 explodes.
    - ``horizon``: how many steps back from T−1 the norm stays within 10⁻³ of its maximum.
    """

    log10_first_last: float | np.ndarray
    decay_rate: float | np.ndarray
    horizon: float | np.ndarray

    @classmethod
    def of(cls, profile: np.ndarray) -> Summary:
        profile = np.asarray(profile, dtype=np.float64)
        if profile.ndim == 1:
            return cls(**summarize(profile))
        rows = [summarize(row) for row in profile]
        return cls(**{k: np.array([r[k] for r in rows]) for k in rows[0]})

    def scalars(self) -> dict[str, float]:
        if np.ndim(self.decay_rate):  # rows: the monitor names each row's tags itself
            return {}
        return {f"grad_flow/{k}": float(v) for k, v in dataclasses.asdict(self).items()}


def summarize(dL_dz: np.ndarray) -> dict[str, float]:
    """`Summary` of one profile (T,). Non-finite or zero norms are left out of the fit; the
    results are nan when nothing is left."""
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


@dataclass
class Record:
    """One monitored step of one watched module (the table in the module docstring)."""

    step: int
    profiles: dict[str, np.ndarray]
    rows: tuple[str, ...] | None = None
    loss: float | None = None
    grad_norms: dict[str, float] = field(default_factory=dict)
    contributions: dict[str, np.ndarray] = field(default_factory=dict)
    jacobians: Jacobians | None = None
    spectrum: Spectrum | None = None
    lyapunov: Lyapunov | None = None

    PREFIXES: ClassVar[dict[str, str]] = {"contributions": "dL_dW_", "profiles": "dL_d",
                                          "grad_norms": "grad_norm_"}  # in this order

    @classmethod
    def from_pass(cls, step: int, probed, reduce=None, world_size: int = 1) -> Record:
        """The profiles (and contributions) of a `rnnlab.probing.ProbedPass` after backward."""
        return cls(step, probed.profiles(reduce, world_size), probed.rows,
                   contributions=probed.contributions(reduce, world_size))

    @property
    def T(self) -> int:
        return int(np.shape(next(iter(self.profiles.values())))[-1])

    @property
    def main_profile(self) -> np.ndarray:
        """The first state's profile (what the decoder reads; ``dL_dz`` or ``dL_dh``)."""
        return next(iter(self.profiles.values()))

    @property
    def summary(self) -> Summary:
        return Summary.of(self.main_profile)

    def sections(self) -> dict[str, Section]:
        """The instruments' sections this record holds, by field name."""
        return {name: value for name in section_fields()
                if (value := getattr(self, name)) is not None}

    def per_timestep(self) -> dict[str, np.ndarray]:
        """Every (T,) or (rows, T) array: profiles, contributions and the sections' own."""
        arrays = {**self.profiles, **self.contributions}
        for section in self.sections().values():
            arrays.update(section.per_timestep())
        return arrays

    def scalars(self) -> dict[str, float]:
        """Logger tags → values of the summary and of every section (not per-timestep)."""
        scalars = self.summary.scalars()
        for section in self.sections().values():
            scalars.update(section.scalars())
        return scalars

    def arrays(self) -> dict[str, np.ndarray]:
        """The file's contents: every key as a float64 array (``rows`` as strings)."""
        out = {k: np.asarray(v, dtype=np.float64) for k, v in
               {**self.profiles, **self.contributions, **self.grad_norms}.items()}
        if self.loss is not None:
            out["loss"] = np.asarray(self.loss, dtype=np.float64)
        out.update(self.summary.arrays())
        for section in self.sections().values():
            out.update(section.arrays())
        out["step"] = np.asarray(self.step, dtype=np.int64)
        out["T"] = np.asarray(self.T, dtype=np.int64)
        if self.rows is not None:
            out["rows"] = np.asarray(self.rows, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Record:
        """The inverse of `arrays`: a record from a file's (or a stacked row's) arrays."""
        derived = {f.name for f in dataclasses.fields(Summary)}
        sections = {name: section.from_arrays(arrays) for name, section in section_fields().items()}
        claimed = {f.name for name, s in sections.items() if s is not None
                   for f in dataclasses.fields(s)}
        groups: dict[str, dict] = {name: {} for name in cls.PREFIXES}
        for key, value in arrays.items():
            if key in claimed or key in derived or key in ("step", "T", "rows", "loss"):
                continue
            group = next((g for g, prefix in cls.PREFIXES.items() if key.startswith(prefix)),
                         None)
            if group is not None:
                groups[group][key] = float(value) if group == "grad_norms" else value
        loss = float(arrays["loss"]) if "loss" in arrays else None
        rows = tuple(str(r) for r in arrays["rows"]) if "rows" in arrays else None
        return cls(int(arrays["step"]), groups["profiles"], rows, loss, groups["grad_norms"],
                   groups["contributions"], **sections)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/step_<step:07d>.npz`` whole or not at all (a temporary file in the
        same directory, renamed over the target once written)."""
        path = record_path(directory, self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **self.arrays())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Record:
        with np.load(path) as data:
            return cls.from_arrays(dict(data))


@cache
def section_fields() -> dict[str, type[Section]]:
    """Field name → `Section` subclass, for every field of `Record` typed ``<Section> | None``."""
    fields = {}
    for name, hint in typing.get_type_hints(Record).items():
        options = typing.get_args(hint) if isinstance(hint, UnionType) else (hint,)
        section = next((o for o in options if isinstance(o, type) and issubclass(o, Section)),
                       None)
        if section is not None:
            fields[name] = section
    return fields


def record_path(directory: str | Path, step: int) -> Path:
    """Where a record of ``step`` lives: ``<directory>/step_<step:07d>.npz``."""
    return Path(directory) / f"step_{step:07d}.npz"


def records_dir(path: str | Path, module: str | None = None) -> Path:
    """The directory of a run's records: ``<run>/grad_flow`` (``/<module path>`` for a watched
    torch.nn module), or ``path`` itself if it holds records."""
    path = Path(path)
    directory = path / GRAD_FLOW if (path / GRAD_FLOW).is_dir() else path
    return directory / module if module else directory


def load(run_dir: str | Path, module: str | None = None) -> dict[str, np.ndarray]:
    """Stack one run's records, ordered by step: ``dL_dz`` (steps, T), ``step`` (steps,), …

    ``run_dir``: a run directory (holding ``grad_flow/``) or a records directory. ``module``: the
    path of a watched torch.nn module, whose records are ``grad_flow/<module>/step_*.npz``. A key
    that only some records hold (``jacobian_norm`` on steps without the Jacobians) is NaN in the
    others; ``rows`` (the rows' names of a torch.nn module's profiles) is not stacked.
    """
    directory = records_dir(run_dir, module)
    files = sorted(directory.glob(RECORD_GLOB))
    if not files:
        raise FileNotFoundError(
            f"no {RECORD_GLOB} in {directory}: give a run directory of scripts/train.py with the "
            "monitor on (monitor.every_n_steps), or a directory of records"
            + (f" (watched modules there: {', '.join(watched_modules(run_dir))})"
               if watched_modules(run_dir) else ""))
    records = []
    for path in files:
        with np.load(path) as data:
            records.append(dict(data))
    records.sort(key=lambda r: int(r["step"]))
    rows = records[-1].pop("rows", None)
    for r in records:
        r.pop("rows", None)
    shapes = {k: np.shape(v) for r in reversed(records) for k, v in r.items()}
    stacked = {k: np.stack([r[k] if k in r else np.full(shape, math.nan) for r in records])
               for k, shape in sorted(shapes.items())}
    if rows is not None:
        stacked["rows"] = rows
    return stacked


def watched_modules(run_dir: str | Path) -> list[str]:
    """The module paths with records of their own under a run's ``grad_flow/``."""
    root = records_dir(run_dir)
    return sorted(str(p.parent.relative_to(root)) for p in root.glob(f"**/{RECORD_GLOB}")
                  if p.parent != root and not any(part.startswith(".") for part in p.parts))
