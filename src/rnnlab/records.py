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
                   lyapunov_prediction (T,), predicted_decay_rate,
                   lyapunov_per_time (k,) (cells with a time step);
                   (rows, …) first for torch.nn modules
    sources        source_<field> str                            which computation gave a field,
                                                                 where not the training step

A file is ``<directory>/step_<step:07d>.npz``: float64 arrays (scalars 0-d), with ``step`` and
``T``. A pack, ``<directory>/steps_<first:07d>-<last:07d>.npz``, holds the records of several
monitored steps in one file (the monitor writes packs when it records often,
``monitor.records_per_file``: a file per step costs more than the step's record): every key that
all its records hold with one shape and dtype as one array, a row per record in step order
(``step`` (n,) among them), and a key only some hold (the Jacobians of the one step that has
them) as ``<step:07d>/<key>`` — packs of every key as ``<step:07d>/<key>`` read the same. `load`,
`read_records` and `load_records` read files and packs.

Every number comes from the monitored training step itself, except where ``sources`` says
otherwise: with ``monitor.profile_dtype=float64`` the profiles, contributions and loss come from
a float64 copy of the model (``source_profiles = "float64_copy"``), the gradient norms and
Jacobians from the training step (``"training_step"``).

A new instrument is a `Section` subclass (its keys, its logged scalars) and one field of
`Record` typed with it; writing, reading, logging and `load`'s stacking follow from the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import UnionType
from typing import ClassVar

import numpy as np

from rnnlab.rundir import GRAD_FLOW, BackgroundWriter, RunFileError, atomic_write

HORIZON_THRESHOLD = 1e-3
RECORD_GLOB = "step_*.npz"  # one record
PACK_GLOB = "steps_*.npz"  # several monitored steps' records (`save_records`)
RECORD_GLOBS = (RECORD_GLOB, PACK_GLOB)
SOURCE_PREFIX = "source_"


class Section:
    """An instrument's part of a record: a dataclass of float64 arrays and floats.

    Subclasses are dataclasses whose field names are their keys in the file; `scalars` names the
    tags a logger gets, `per_timestep` the (T,) arrays whose chosen timesteps are logged.
    """

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as a float64 array; an optional field (default None) only when set."""
        return {f.name: np.asarray(getattr(self, f.name), dtype=np.float64)
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Section | None:
        """The section held in a file's arrays, or None when the step did not measure it (a
        required field missing, or NaN where `load` stacked records that lack it). An optional
        field (default None) is read when the file holds it."""
        required = [f.name for f in dataclasses.fields(cls) if f.default is not None]
        if not all(n in arrays for n in required):
            return None
        names = [f.name for f in dataclasses.fields(cls) if f.name in arrays]
        values = {n: np.asarray(arrays[n]) for n in names}
        if all(np.isnan(values[n]).all() for n in required):
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
    ``predicted_decay_rate`` that profile's decay rate, fitted as ``decay_rate`` is.
    ``lyapunov_per_time`` (k,): for a cell with a time step (an ODE), the batch mean of the
    exponents in log10 per unit of time; None (not in the file) for a discrete cell.

    A watched torch.nn module's section has a row per layer and direction, as its profiles
    (`rnnlab.lyapunov.watched_lyapunov`): ``lyapunov`` (rows, k), ``lyapunov_per_sequence``
    (rows, S, k), ``lyapunov_prediction`` (rows, T), ``predicted_decay_rate`` (rows,); the
    monitor names each row's tags (`row_scalars`).

    Under data parallelism the batch means are over every process's sequences and
    ``lyapunov_per_sequence`` holds process 0's (`rnnlab.lyapunov.mean_over_processes`)."""

    lyapunov: np.ndarray
    lyapunov_per_sequence: np.ndarray
    lyapunov_prediction: np.ndarray
    predicted_decay_rate: float
    lyapunov_per_time: np.ndarray | None = None

    def scalars(self) -> dict[str, float]:
        if np.ndim(self.lyapunov) > 1:  # rows: the monitor names each row's tags (row_scalars)
            return {}
        exponents = {f"lyapunov/lambda_{i}": float(v)
                     for i, v in enumerate(np.ravel(self.lyapunov), start=1)}
        if self.lyapunov_per_time is not None:
            exponents.update({f"lyapunov/lambda_{i}_per_time": float(v)
                              for i, v in enumerate(np.ravel(self.lyapunov_per_time), start=1)})
        return {"grad_flow/predicted_decay_rate": self.predicted_decay_rate, **exponents}

    def row_scalars(self, row: int, where: str) -> dict[str, float]:
        """The tags of row ``row`` of a section with rows, ``where`` = ``<module path>/<row>``:
        ``grad_flow/<where>/predicted_decay_rate`` and ``lyapunov/<where>/lambda_<i>``."""
        tags = {f"grad_flow/{where}/predicted_decay_rate":
                float(np.ravel(self.predicted_decay_rate)[row])}
        tags.update({f"lyapunov/{where}/lambda_{i}": float(v)
                     for i, v in enumerate(np.atleast_2d(self.lyapunov)[row], start=1)})
        return tags


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
        return {f"grad_flow/{f.name}": float(getattr(self, f.name))
                for f in dataclasses.fields(self)}


def least_squares_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The slope of the least-squares line through the points (x, y), nan for fewer than two
    distinct x: Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², the centred normal equation, which is what
    `np.polyfit(x, y, 1)[0]` solves (by an SVD, ~10 times the time on a profile of 100)."""
    if x.size < 2:
        return float("nan")
    dx = x - x.mean()
    return float(np.dot(dx, y - y.mean()) / np.dot(dx, dx))


def summarize(dL_dz: np.ndarray) -> dict[str, float]:
    """`Summary` of one profile (T,). Non-finite or zero norms are left out of the fit; the
    results are nan when nothing is left."""
    dL_dz = np.asarray(dL_dz, dtype=np.float64)
    T = dL_dz.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(dL_dz)
        first_last = float(log[0] - log[-1])
    ok = np.isfinite(log)
    decay = least_squares_slope((T - 1 - np.arange(T))[ok], log[ok])
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
    sources: dict[str, str] = field(default_factory=dict)  # field → computation, if not the step
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
        """`Summary` of the main profile, made once per profile array (the monitor reads it
        for the logs, the record file, the TensorBoard summary and its own messages)."""
        profile = self.main_profile
        cached = self.__dict__.get("_summary")
        if cached is None or cached[0] is not profile:
            cached = self.__dict__["_summary"] = (profile, Summary.of(profile))
        return cached[1]

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
        for name, source in self.sources.items():
            out[SOURCE_PREFIX + name] = np.asarray(source, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Record:
        """The inverse of `arrays`: a record from a file's (or a stacked row's) arrays."""
        derived = {f.name for f in dataclasses.fields(Summary)}
        sections = {name: section.from_arrays(arrays) for name, section in section_fields().items()}
        claimed = {f.name for name, s in sections.items() if s is not None
                   for f in dataclasses.fields(s)}
        groups: dict[str, dict] = {name: {} for name in cls.PREFIXES}
        sources: dict[str, str] = {}
        for key, value in arrays.items():
            if key in claimed or key in derived or key in ("step", "T", "rows", "loss"):
                continue
            if key.startswith(SOURCE_PREFIX):
                sources[key.removeprefix(SOURCE_PREFIX)] = str(value)
                continue
            group = next((g for g, prefix in cls.PREFIXES.items() if key.startswith(prefix)),
                         None)
            if group is not None:
                groups[group][key] = float(value) if group == "grad_norms" else value
        loss = float(arrays["loss"]) if "loss" in arrays else None
        rows = tuple(str(r) for r in arrays["rows"]) if "rows" in arrays else None
        return cls(int(arrays["step"]), groups["profiles"], rows, loss, groups["grad_norms"],
                   groups["contributions"], **sections, sources=sources)

    def save(self, directory: str | Path, writer: BackgroundWriter | None = None) -> Path:
        """Write ``<directory>/step_<step:07d>.npz`` whole or not at all (`atomic_write`: a
        temporary file in the same directory, renamed over the target once on disk; a full
        disk is a `DiskFullError` naming the file). With a ``writer``, the record's arrays are
        taken now and written on its thread (`BackgroundWriter`: its ``wait`` returns once the
        file is on disk)."""
        return save_records([self], directory, writer)

    @classmethod
    def load(cls, path: str | Path) -> Record:
        """The record in ``path``; a file that is not a whole record is a `RunFileError`
        naming it."""
        return cls.from_arrays(read_record(Path(path)))


def read_record(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one record file, checked to be a whole record (``step``, a profile);
    otherwise a `RunFileError` naming the file and what to do."""
    return check_record(path, read_npz(path))


def read_records(path: Path) -> list[dict[str, np.ndarray]]:
    """The arrays of every record in a record file (one) or a pack (`save_records`: several,
    ordered by step), each checked as `read_record` checks one."""
    path = Path(path)
    if not is_pack(path):
        return [read_record(path)]
    data = read_npz(path)
    rows = {key: value for key, value in data.items() if "/" not in key}  # a row per record
    records: dict[str, dict[str, np.ndarray]] = {}
    if rows:
        steps = rows.get("step")
        if steps is None or steps.ndim != 1 or any(v.shape[:1] != steps.shape for v in
                                                   rows.values()):
            shapes = ", ".join(f"{k} {v.shape}" for k, v in sorted(rows.items()))
            raise RunFileError(f"{path} holds {shapes}, not a row of each for every step of its "
                               "'step' (n,) nor <step>/<key>: it is not a pack of records written "
                               "by rnnlab; move it out of the records directory")
        for i, step in enumerate(steps.tolist()):
            records[f"{int(step):07d}"] = {key: np.asarray(value[i])
                                           for key, value in rows.items()}
    for name, value in data.items():
        if name in rows:
            continue
        step, slash, key = name.partition("/")
        if not (slash and step.isdigit() and key):
            raise RunFileError(f"{path} holds {name!r}, not <step>/<key>: it is not a pack of "
                               "records written by rnnlab; move it out of the records directory")
        if rows and step not in records:
            raise RunFileError(f"{path} holds {name!r}, of a step its 'step' does not list: it is "
                               "not a pack written by rnnlab; move it out of the records directory")
        records.setdefault(step, {})[key] = value
    if not records:
        raise RunFileError(f"{path} holds no records: it is not a pack written by rnnlab; "
                           "delete it (the run's other records load without it)")
    checked = []
    for step in sorted(records, key=int):
        arrays = check_record(path, records[step])
        if int(arrays["step"]) != int(step):
            raise RunFileError(f"{path} holds step {int(arrays['step'])} under {step}/: it is not "
                               "a pack written by rnnlab; move it out of the records directory")
        checked.append(arrays)
    return checked


def load_records(path: str | Path) -> list[Record]:
    """The `Record` of every step in a record file or a pack."""
    return [Record.from_arrays(arrays) for arrays in read_records(Path(path))]


def record_of(directory: str | Path, step: int) -> Record:
    """The record of ``step`` in a records directory, in its own file or in a pack."""
    directory = Path(directory)
    single = record_path(directory, step)
    if single.exists():
        return Record.load(single)
    for path in record_files(directory):
        first, _, last = path.stem.removeprefix("steps_").partition("-")
        if is_pack(path) and first.isdigit() and last.isdigit() and \
                int(first) <= step <= int(last):
            found = [record for record in load_records(path) if record.step == step]
            if found:
                return found[0]
    raise FileNotFoundError(f"no record of step {step} in {directory} (its files: "
                            f"{', '.join(p.name for p in record_files(directory)) or 'none'})")


def is_pack(path: Path) -> bool:
    return path.name.startswith("steps_")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return dict(data)
    except FileNotFoundError:  # no file: not one cut short
        raise
    except Exception as error:  # zero bytes (EOFError), cut short (BadZipFile), not an npz
        raise RunFileError(
            f"{path} cannot be read ({type(error).__name__}: {error}): the record was cut short "
            "(the run was killed or the disk filled up while it was written) or is not a "
            "record; delete it (the run's other records load without it)") from None


def check_record(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "step" not in arrays:
        raise RunFileError(f"{path} holds no 'step' (keys: {', '.join(sorted(arrays))}): it is "
                           "not a record written by rnnlab; move it out of the records directory")
    if not any(k.startswith(Record.PREFIXES["profiles"]) for k in arrays):
        raise RunFileError(f"{path} holds no profile (dL_dz, dL_dh, …): it is not a record "
                           "written by rnnlab; move it out of the records directory")
    return arrays


def save_records(records: list[Record], directory: str | Path,
                 writer: BackgroundWriter | None = None) -> Path:
    """Write the records of consecutive monitored steps: one as its own file,
    ``step_<step:07d>.npz``, several as one pack, ``steps_<first:07d>-<last:07d>.npz``
    (`pack_arrays`), whole or not at all; with a ``writer``, on its thread (the arrays are
    taken now). Returns the file's path."""
    if len(records) == 1:
        path, arrays = record_path(directory, records[0].step), records[0].arrays()
    else:
        path = pack_path(directory, records[0].step, records[-1].step)
        arrays = pack_arrays(records)
    if writer is None:
        write_arrays(path, arrays)
    else:
        writer.submit(write_arrays, path, arrays)
    return path


def pack_arrays(records: list[Record]) -> dict[str, np.ndarray]:
    """A pack's arrays: each key that every record holds with one shape and dtype stacked, a row
    per record (``step`` among them), every other one as ``<step:07d>/<key>``. A key per array of
    each record made a pack of 50 records of 12 keys 600 entries of its zip file: 6.4 ms to write
    into memory against 0.2 ms for 12, and an LRU monitored every step at T = 100 spent about a
    tenth of its time writing them."""
    arrays = [record.arrays() for record in records]
    first = arrays[0]
    rows = {key: np.stack([a[key] for a in arrays]) for key, value in first.items()
            if all(key in a and a[key].shape == value.shape and a[key].dtype == value.dtype
                   for a in arrays[1:])}
    for record, held in zip(records, arrays):
        rows.update({f"{record.step:07d}/{key}": value for key, value in held.items()
                     if key not in rows})
    return rows


def record_T(arrays: dict[str, np.ndarray]) -> int:
    """The T of a record's arrays: its ``T``, or its first profile's length."""
    if "T" in arrays:
        return int(arrays["T"])
    profile = next(v for k, v in arrays.items() if k.startswith(Record.PREFIXES["profiles"]))
    return int(np.shape(profile)[-1])


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


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda file: np.savez(file, **arrays))


def record_path(directory: str | Path, step: int) -> Path:
    """Where a record of ``step`` lives: ``<directory>/step_<step:07d>.npz``."""
    return Path(directory) / f"step_{step:07d}.npz"


def pack_path(directory: str | Path, first: int, last: int) -> Path:
    """Where the pack of the records of steps ``first`` … ``last`` lives."""
    return Path(directory) / f"steps_{first:07d}-{last:07d}.npz"


def record_files(directory: Path, below: bool = False) -> list[Path]:
    """The record files and packs in ``directory`` (``below``: and in its subdirectories, as a
    run's ``grad_flow/`` holds watched modules' records), by path."""
    return sorted(path for pattern in RECORD_GLOBS
                  for path in directory.glob(f"**/{pattern}" if below else pattern))


def records_dir(path: str | Path, module: str | None = None) -> Path:
    """The directory of a run's records: ``<run>/grad_flow`` (``/<module path>`` for a watched
    torch.nn module), or ``path`` itself if it holds records."""
    path = Path(path)
    directory = path / GRAD_FLOW if (path / GRAD_FLOW).is_dir() else path
    return directory / module if module else directory


def load(run_dir: str | Path, module: str | None = None) -> dict[str, np.ndarray]:
    """Stack one run's records, ordered by step: ``dL_dz`` (steps, T), ``step`` (steps,), …

    ``run_dir``: a run directory (holding ``grad_flow/``) or a records directory. ``module``: the
    path of a watched torch.nn module, whose records are ``grad_flow/<module>/step_*.npz`` (and
    packs of several steps' records, ``steps_*.npz``). A key that only some records hold
    (``jacobian_norm`` on steps without the Jacobians) is NaN in the others; ``rows`` (the rows'
    names of a torch.nn module's profiles) and ``source_<field>`` are the latest record's, not
    stacked.

    A `RunFileError` names the file and what to do when a record cannot be read (cut short by a
    kill or a full disk, zero bytes), is not a record (no ``step``), or belongs to another run
    (another T, a step twice); and when ``run_dir`` holds several runs rather than one.
    """
    directory = records_dir(run_dir, module)
    files = record_files(directory)
    if not files:
        runs = runs_under(directory)
        if runs:
            raise RunFileError(
                f"{directory} is not a run directory: it holds {len(runs)} runs "
                f"({', '.join(str(r.relative_to(directory)) for r in runs[:5])}"
                f"{', …' if len(runs) > 5 else ''}); load one run per directory, e.g. "
                f"load('{runs[0]}') (rnnlab report compares several)")
        raise FileNotFoundError(
            f"no {RECORD_GLOB} (or {PACK_GLOB}) in {directory}: give a run directory of rnnlab "
            "train with the monitor on (monitor.every_n_steps), or a directory of records"
            + (f" (watched modules there: {', '.join(watched_modules(run_dir))})"
               if watched_modules(run_dir) else ""))
    files, records = zip(*((path, arrays) for path in files for arrays in read_records(path)))
    check_one_run(files, records)
    order = sorted(range(len(records)), key=lambda i: int(records[i]["step"]))
    records = [records[i] for i in order]
    # Strings, not stacked: the rows' names, and the sources (one per run: its profile_dtype).
    strings = {k: v for k, v in records[-1].items() if k == "rows" or k.startswith(SOURCE_PREFIX)}
    records = [{k: v for k, v in r.items() if k not in strings} for r in records]
    shapes = {k: np.shape(v) for r in reversed(records) for k, v in r.items()}
    stacked = {k: np.stack([r[k] if k in r else np.full(shape, math.nan) for r in records])
               for k, shape in sorted(shapes.items())}
    stacked.update(strings)
    return stacked


def check_one_run(files: Sequence[Path], records: Sequence[dict[str, np.ndarray]]) -> None:
    """The records of one directory must be one run's: one T, each step once; otherwise a
    `RunFileError` naming the files that disagree (``files[i]`` holds ``records[i]``)."""
    first: dict[int, Path] = {}
    for path, arrays in zip(files, records):
        step = int(arrays["step"])
        if step in first:
            raise RunFileError(f"{first[step]} and {path} both hold step {step}: two runs' "
                               "records in one directory; keep one run's records per directory")
        first[step] = path
    T = record_T(records[0])
    for path, arrays in zip(files, records):
        if record_T(arrays) != T:
            raise RunFileError(
                f"{path} holds T = {record_T(arrays)}, but {files[0]} T = {T}: records of runs "
                "with different task.seq_len in one directory; move it into its own run "
                "directory")


def runs_under(directory: Path) -> list[Path]:
    """The run directories (holding ``grad_flow/`` with records) below ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(p.parent for p in directory.glob(f"**/{GRAD_FLOW}")
                  if p.is_dir() and record_files(p, below=True))


def watched_modules(run_dir: str | Path) -> list[str]:
    """The module paths with records of their own under a run's ``grad_flow/``."""
    root = records_dir(run_dir)
    return sorted({str(p.parent.relative_to(root)) for p in record_files(root, below=True)
                   if p.parent != root and not any(part.startswith(".") for part in p.parts)})
