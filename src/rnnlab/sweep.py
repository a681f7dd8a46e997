"""Jobs of a Hydra sweep: isolate each, record its failure, summarise the sweep.

`run(cfg)` is what `scripts/train.py` calls for every job, single run or multirun:

- it sets the job's torch threads (``threads``) and restores the process-wide torch state on exit,
  so jobs that share one process (the basic launcher) cannot leak threads, anomaly mode,
  deterministic algorithms or the default dtype into each other;
- in a multirun, an exception (bad config, NaN loss, out of memory) does not stop the sweep: it is
  written to ``<job dir>/failed.json`` (type, message, traceback), logged, and the job returns the
  finite ``sweep.failure_value`` so that a sweeper such as Optuna records a bad trial and goes on;
  in a single run the exception propagates (scripts/train.py turns a ConfigError into exit 2);
- it returns ``metrics[sweep.objective]`` (default ``val/loss``), the value a sweeper optimises.

`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in conf/hydra/default.yaml) writes
``<sweep dir>/summary.json`` and ``summary.md`` when the sweep ends, by scanning the job
directories, so it works for every launcher. ``python -m rnnlab.sweep <sweep dir>`` rewrites them
(e.g. after a cluster job was killed before the sweep could end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rnnlab.config import ConfigError, is_number, require, validate_threads
from rnnlab.rundir import FAILED_FILE, METRICS_FILE, OUTCOMES, OVERRIDES_FILE, RunDir
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
    record = {"error_type": type(error).__name__, "message": str(error),
              "traceback": "".join(traceback.format_exception(error))}
    run = RunDir(job_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    run.failed.write_text(json.dumps(record, indent=2) + "\n")
    return record


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
    """Train one job and return its objective; in a multirun a failed job returns the penalty."""
    penalty = failure_value(cfg)
    if not in_multirun():
        metrics, value = train_job(cfg)
    else:
        try:
            metrics, value = train_job(cfg)
            if not math.isfinite(value):  # a sweeper cannot rank a NaN
                raise FloatingPointError(f"the objective is {value} after {metrics['step']} steps")
        except Exception as error:
            record_failure(cfg.paths.output_dir, error)
            log.error("job failed (traceback in %s), returning sweep.failure_value=%g: %s: %s",
                      FAILED_FILE, penalty, type(error).__name__, error)
            return penalty
    report_finish(cfg, metrics)
    return value


# --- the sweep's summary -------------------------------------------------------------------------
def job_status(job_dir: Path) -> dict[str, Any]:
    """One job's row: its directory, number, overrides, status, final metrics and error."""
    run = RunDir(job_dir)
    overrides = OmegaConf.to_container(OmegaConf.load(run.overrides))
    num = OmegaConf.load(run.overrides.with_name("hydra.yaml")).hydra.job.get("num")
    outcome = run.outcome()
    row: dict[str, Any] = {"job": job_dir.name, "num": num, "overrides": overrides,
                           "status": outcome.status}
    if outcome.status == "failed":
        row["error"] = f"{outcome.failure['error_type']}: {outcome.failure['message']}"
    elif outcome.status == "completed":
        row["metrics"] = outcome.metrics
    else:  # killed from outside (OOM killer, cluster time limit) or still running
        row["error"] = f"no {METRICS_FILE} and no {FAILED_FILE}"
    return row


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job directory under ``sweep_dir`` (found by its ``.hydra/overrides.yaml``)."""
    jobs = [job_status(p.parent.parent) for p in Path(sweep_dir).glob(f"*/{OVERRIDES_FILE}")]
    return sorted(jobs, key=lambda r: (r["num"] is None, r["num"] or 0, r["job"]))


def markdown_table(jobs: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| job | overrides | status | val/loss | val/baseline | step | error |",
             "|---|---|---|---|---|---|---|"]
    for row in jobs:
        metrics = row.get("metrics", {})
        lines.append("| " + " | ".join(cell(v) for v in (
            row["job"], " ".join(row["overrides"]), row["status"], metrics.get("val/loss", ""),
            metrics.get("val/baseline", ""), metrics.get("step", ""), row.get("error", ""))) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``sweep_dir``; return the summary."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    counts = {s: sum(r["status"] == s for r in jobs) for s in OUTCOMES}
    summary = {"sweep_dir": str(sweep_dir), "counts": counts, "jobs": jobs}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (sweep_dir / "summary.md").write_text(
        f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in
                                                              counts.items()) +
        f"\n\n{markdown_table(jobs)}\n\nTensorBoard: `tensorboard --logdir {sweep_dir}`\n")
    return summary


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        counts = write_summary(sweep_dir)["counts"]
        print(f"\nSweep: {counts['completed']} completed, {counts['failed']} failed, "
              f"{counts['incomplete']} incomplete; summary in {sweep_dir / 'summary.md'}")
        print(f"TensorBoard: tensorboard --logdir {sweep_dir}")


def main(argv: list[str] | None = None) -> None:
    """``python -m rnnlab.sweep <sweep dir>...``: (re)write each sweep's summary."""
    for sweep_dir in (argv if argv is not None else sys.argv[1:]):
        counts = write_summary(sweep_dir)["counts"]
        print(f"{sweep_dir}: {counts}")


if __name__ == "__main__":
    main()
