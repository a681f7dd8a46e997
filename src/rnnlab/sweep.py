"""Jobs of a Hydra sweep: isolate each, record its failure, summarise the sweep.

`run(cfg)` is what `rnnlab train` calls for every job, single run or multirun:

- it sets the job's torch threads (``threads``) and restores the process-wide torch state on exit,
  so jobs that share one process (the basic launcher) cannot leak threads, anomaly mode,
  deterministic algorithms or the default dtype into each other;
- in a multirun, an exception (bad config, NaN loss, out of memory) does not stop the sweep: it is
  written to ``<job dir>/failed.json`` (type, message, traceback), logged, and the job returns the
  finite ``sweep.failure_value`` so that a sweeper such as Optuna records a bad trial and goes on;
  in a single run the exception propagates (`rnnlab.cli.run_job` turns a ConfigError into exit 2);
- under the joblib launcher each job runs in a process of its own, so that a job killed from
  outside (the out-of-memory killer) is recorded as failed and the sweep goes on;
- a signal (Ctrl-C, SIGTERM) stops the job at a checkpoint and the whole sweep with it;
- it returns ``metrics[sweep.objective]`` (default ``val/loss``), the value a sweeper optimises.

`SweptNames` (a Hydra callback) names each job's directory by the overrides that are swept.
`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in conf/hydra/default.yaml) writes
``<sweep dir>/summary.json`` and ``summary.md`` when the sweep ends, by scanning the job
directories, so it works for every launcher. ``python -m rnnlab.sweep <sweep dir>`` rewrites them
(e.g. after a cluster job was killed before the sweep could end).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from rnnlab.checkpointing import RunInterrupted
from rnnlab.config import ConfigError, is_number, require, validate_threads
from rnnlab.rundir import (
    FAILED_FILE,
    METRICS_FILE,
    OUTCOMES,
    OVERRIDES_FILE,
    SKIPPED,
    RunDir,
    RunFileError,
    atomic_write,
    finite_json,
    write_json,
)
from rnnlab.train import report_finish, train

log = logging.getLogger(__name__)

def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def job_threads(setting: Any) -> int | None:
    """Torch threads for this job: an integer, or ``auto``.

    ``auto``: the CPUs divided among the joblib launcher's parallel jobs (1 each with its default
    ``n_jobs=-1``); SLURM's ``cpus_per_task`` on a cluster; otherwise None (PyTorch's default).
    """
    if setting != "auto":
        return setting
    cpus = available_cpus()
    if HydraConfig.initialized() and "joblib" in str(HydraConfig.get().launcher.get("_target_")):
        n_jobs = HydraConfig.get().launcher.get("n_jobs") or -1
        workers = n_jobs if n_jobs > 0 else max(cpus + 1 + n_jobs, 1)  # joblib: -1 = all CPUs
        return max(cpus // workers, 1)
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return None


@contextlib.contextmanager
def isolated_job(threads: int | None) -> Iterator[None]:
    """Run one job with ``threads`` torch threads; restore the process-wide torch state after."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.is_anomaly_enabled(),
             torch.get_default_dtype(), torch.is_grad_enabled())
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.set_anomaly_enabled(saved[3])
        torch.set_default_dtype(saved[4])
        torch.set_grad_enabled(saved[5])


def failure_value(cfg: DictConfig) -> float:
    """``sweep.failure_value``: what a failed job returns to the sweeper (finite)."""
    penalty = (cfg.get("sweep") or {}).get("failure_value", 1.0e6)
    require(is_number(penalty), "sweep.failure_value", penalty, "a finite number")
    return float(penalty)


def check_job_settings(cfg: DictConfig) -> tuple[int | None, str]:
    """``threads`` and ``sweep.objective``, checked before training."""
    threads = validate_threads(cfg.get("threads", "auto"))
    objective = (cfg.get("sweep") or {}).get("objective", "val/loss")
    require(isinstance(objective, str) and objective.startswith("val/"), "sweep.objective",
            objective, "a validation metric such as val/loss")
    return job_threads(threads), objective


def record_failure(job_dir: str | Path, error: BaseException) -> dict[str, str]:
    """Write ``<job dir>/failed.json``: the error's type, message and traceback."""
    return RunDir(job_dir).write_failure(error)


def train_job(cfg: DictConfig) -> tuple[dict[str, float], float]:
    """Check the job's settings, train in isolation, return (metrics, objective value)."""
    threads, objective = check_job_settings(cfg)
    with isolated_job(threads):
        log.info("torch threads: %d", torch.get_num_threads())
        metrics = train(cfg)
    if objective not in metrics:
        logged = ", ".join(sorted(k for k in metrics if k.startswith("val/")))
        raise ConfigError(f"sweep.objective must be one of {logged}, got "
                          f"{objective!r} (set sweep.objective=...)")
    return metrics, metrics[objective]


def run(cfg: DictConfig) -> float:
    """Train one job and return its objective; in a multirun a failed job returns the penalty.

    A single run refused for a config error leaves no directory behind (what Hydra wrote there
    before the run started is removed).
    """
    penalty = failure_value(cfg)
    if not in_multirun():
        try:
            metrics, value = train_job(cfg)
        except ConfigError:
            if RunDir(cfg.paths.output_dir).discard_if_fresh():
                log.info("removed %s: the run was refused before it started",
                         cfg.paths.output_dir)
            raise
        report_finish(cfg, metrics)
        return value
    if in_joblib_worker():
        return run_in_child(cfg, penalty)
    return run_job(cfg, penalty)


def run_job(cfg: DictConfig, penalty: float) -> float:
    """One job of a multirun: its objective, or the penalty with its error in failed.json."""
    try:
        metrics, value = train_job(cfg)
        if not math.isfinite(value):  # a sweeper cannot rank a NaN
            raise FloatingPointError(f"the objective is {value} after {metrics['step']} steps")
    except Exception as error:
        try:
            record_failure(cfg.paths.output_dir, error)
        except OSError as write_error:  # a full disk, say: the log still has it
            log.error("could not write %s: %s", FAILED_FILE, write_error)
        log.error("job failed (traceback in %s), returning sweep.failure_value=%g: %s: %s",
                  FAILED_FILE, penalty, type(error).__name__, error)
        return penalty
    report_finish(cfg, metrics)
    return value


def in_joblib_worker() -> bool:
    return in_multirun() and "joblib" in str(HydraConfig.get().launcher.get("_target_"))


class JobDied(RuntimeError):
    """The process of a job ended without a result: it was killed from outside."""


def run_in_child(cfg: DictConfig, penalty: float) -> float:
    """`run_job` in a forked child of this joblib worker, which waits for it.

    The out-of-memory killer kills the process that holds the memory: the child. The worker
    lives on, records the job as failed and takes the next one; had the worker died, joblib
    would have cancelled every job in flight and the sweep would have ended without its
    summary. The worker itself runs no torch code, so forking it is safe.
    """
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=child_job, args=(cfg, penalty, writer))
    child.start()
    writer.close()
    try:
        message = reader.recv()
    except EOFError:  # the child died before it could answer
        message = None
    finally:
        child.join()
    if message is None:
        how = (f"was killed by {signal.Signals(-child.exitcode).name}" if child.exitcode < 0
               else f"exited with status {child.exitcode}")
        error = JobDied(f"the job's process {how} before it finished (SIGKILL comes most often "
                        "from the out-of-memory killer: see dmesg)")
        record_failure(cfg.paths.output_dir, error)
        log.error("job failed: %s; returning sweep.failure_value=%g", error, penalty)
        return penalty
    if message[0] == "interrupted":
        raise RunInterrupted(*message[1:])
    return message[1]


def child_job(cfg: DictConfig, penalty: float, writer: Any) -> None:
    """The child's side of `run_in_child`: the objective, or the signal that stopped it."""
    try:
        writer.send(("value", run_job(cfg, penalty)))
    except RunInterrupted as stop:
        writer.send(("interrupted", stop.signum, stop.step, stop.checkpoint))
    finally:
        writer.close()


# --- the sweep's summary -------------------------------------------------------------------------
STATUSES = (*OUTCOMES, "unreadable")  # unreadable: a job whose files cannot be read


def job_status(job_dir: Path) -> dict[str, Any]:
    """One job's row: its directory, number, overrides, status, final metrics and error.

    A file that cannot be read makes the row ``unreadable``, its error naming the file."""
    run = RunDir(job_dir)
    row: dict[str, Any] = {"job": job_dir.name, "num": None, "overrides": []}
    try:
        row["overrides"] = read_yaml(run.overrides)
        row["num"] = read_yaml(run.overrides.with_name("hydra.yaml"))["hydra"]["job"].get("num")
        outcome = run.outcome()
    except RunFileError as error:
        row.update(status="unreadable", error=str(error))
        return row
    row["status"] = outcome.status
    if outcome.status == "failed":
        row["error"] = (f"{outcome.failure.get('error_type', '?')}: "
                        f"{outcome.failure.get('message', '')}")
    elif outcome.status == "interrupted":
        row["error"] = (f"{outcome.interruption.get('signal')} at step "
                        f"{outcome.interruption.get('step')}; resume: "
                        f"{outcome.interruption.get('resume')}")
    elif outcome.status == "completed":
        row["metrics"] = finite_json(outcome.metrics)  # one written before NaN became null
        if outcome.every_step_skipped:
            skipped = outcome.metrics[SKIPPED]
            row["error"] = (f"every step skipped for non-finite values ({skipped:g} of them): "
                            "the parameters never moved")
    else:  # killed from outside (OOM killer, cluster time limit) or still running
        row["error"] = f"no {METRICS_FILE} and no {FAILED_FILE}"
    return row


def read_yaml(path: Path) -> Any:
    """A job's Hydra file, or `RunFileError` naming it."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:
        raise RunFileError(f"{path} cannot be read ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); it was cut "
                           "short or edited: delete the job directory or rerun the job") from None


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job directory under ``sweep_dir`` (found by its ``.hydra/overrides.yaml``)."""
    jobs = [job_status(p.parent.parent) for p in Path(sweep_dir).glob(f"*/{OVERRIDES_FILE}")]
    return sorted(jobs, key=lambda r: (r["num"] is None, r["num"] or 0, r["job"]))


def markdown_table(jobs: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        text = ("" if value is None else f"{value:.4g}" if isinstance(value, float)
                else str(value))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| job | overrides | status | val/loss | val/baseline | step | error |",
             "|---|---|---|---|---|---|---|"]
    for row in jobs:
        metrics = row.get("metrics", {})
        lines.append("| " + " | ".join(cell(v) for v in (
            row["job"], " ".join(map(str, row["overrides"])), row["status"],
            metrics.get("val/loss", ""), metrics.get("val/baseline", ""), metrics.get("step", ""),
            row.get("error", ""))) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``sweep_dir``; return the summary.

    Raises `RunFileError` when ``sweep_dir`` is not a directory or cannot be written."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RunFileError(f"{sweep_dir} is not a directory: give a sweep directory "
                           "(outputs/multirun/<date>_<time>)")
    jobs = collect(sweep_dir)
    counts = {s: sum(r["status"] == s for r in jobs) for s in STATUSES}
    summary = {"sweep_dir": str(sweep_dir), "counts": counts, "jobs": jobs}
    text = (f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs: {counts_line(counts)}\n\n"
            f"{markdown_table(jobs)}\n\nTensorBoard: `tensorboard --logdir {sweep_dir}`\n")
    try:
        write_json(sweep_dir / "summary.json", summary)
        atomic_write(sweep_dir / "summary.md", lambda f: f.write(text.encode()))
    except OSError as error:
        raise RunFileError(f"cannot write the summary into {sweep_dir} ({error}); free space "
                           "or make it writable, then run python -m rnnlab.sweep "
                           f"{sweep_dir}") from None
    return summary


def counts_line(counts: dict[str, int]) -> str:
    """``2 completed, 1 failed, 0 incomplete`` (and the other statuses when there are any)."""
    return ", ".join(f"{n} {s}" for s, n in counts.items()
                     if n or s in ("completed", "failed", "incomplete"))


def unreadable(summary: dict[str, Any]) -> list[str]:
    return [row["error"] for row in summary["jobs"] if row["status"] == "unreadable"]


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = write_summary(sweep_dir)
        except RunFileError as error:
            print(f"Summary error: {error}", file=sys.stderr)
            return
        for problem in unreadable(summary):
            print(f"Summary error: {problem}", file=sys.stderr)
        print(f"\nSweep: {counts_line(summary['counts'])}; summary in "
              f"{sweep_dir / 'summary.md'}")
        print(f"TensorBoard: tensorboard --logdir {sweep_dir}")


# --- the jobs' directory names ------------------------------------------------------------------
def constant_keys(config: DictConfig) -> list[str]:
    """The keys of the sweep's command-line overrides that every job shares (``task.seq_len=200``
    given once), when at least one key is swept (``cell.gain=0.9,1.0``, or a list in
    ``hydra.sweeper.params``, as the presets have); [] when nothing is swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(list(config.hydra.overrides.task))
    params = config.hydra.sweeper.get("params") or {}
    preset = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    constant = {o.key_or_group for o in given if not o.is_sweep_override()}
    swept = ({o.key_or_group for o in given if o.is_sweep_override()}
             | {o.key_or_group for o in preset if o.is_sweep_override()} - constant)
    return sorted(constant - swept) if swept else []


class SweptNames(Callback):
    """Hydra callback: a multirun job's directory names only the swept overrides
    (``0_cell.gain=0.9``, not ``0_cell.gain=0.9,task.seq_len=200``), so that TensorBoard, the
    summary and the report show the value that differs.

    Hydra names a job ``${hydra.job.num}_${hydra.job.override_dirname}`` (conf/hydra), leaving out
    ``hydra.job.config.override_dirname.exclude_keys``. Before the sweep starts this adds the
    constant keys to that list, as a Hydra override: every launcher (basic, joblib, submitit)
    rebuilds each job's config from ``hydra.overrides.hydra``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        constant = constant_keys(config)
        if not constant:
            return
        excluded = list(config.hydra.job.config.override_dirname.exclude_keys)
        keys = excluded + [k for k in constant if k not in excluded]
        listed = ",".join(f"'{k}'" for k in keys)  # quoted: keys such as experiment/x
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{listed}]")


def main(argv: list[str] | None = None) -> None:
    """``python -m rnnlab.sweep <sweep dir>...``: (re)write each sweep's summary; exit 2 when a
    directory or a job's file cannot be read, naming it."""
    failed = False
    for sweep_dir in (argv if argv is not None else sys.argv[1:]):
        try:
            summary = write_summary(sweep_dir)
        except RunFileError as error:
            print(f"Summary error: {error}", file=sys.stderr)
            failed = True
            continue
        print(f"{sweep_dir}: {summary['counts']}")
        for problem in unreadable(summary):
            print(f"Summary error: {problem}", file=sys.stderr)
            failed = True
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
