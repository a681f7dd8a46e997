"""Short run labels: name each run by what differs between the runs.

A sweep's runs share most of their configuration; a legend that repeats it hides the one value that
was swept. A run's label is its overrides that are not the same in every run (``cell.gain=0.9``),
in the order they were given; a run without ``run_info``, or one whose overrides all agree with
the others', is named by its ``run_info`` name, else by its TensorBoard run name.
"""

from __future__ import annotations


def override_key(override: str) -> str:
    """``cell.gain`` of ``cell.gain=0.9`` (and of ``+cell.gain=0.9``, ``++cell.gain=0.9``)."""
    return override.split("=", 1)[0].lstrip("+~")


def short_labels(run_infos: dict[str, dict | None]) -> dict[str, str]:
    """run → label, from run → ``{"overrides": [...], "name": ...}`` (None: no run_info).

    Two runs never share a label: a clash (the same overrides twice) appends the run name.
    """
    overrides = {run: {override_key(o): o for o in info.get("overrides", [])}
                 for run, info in run_infos.items() if info is not None}
    keys: list[str] = []
    for by_key in overrides.values():
        keys += [k for k in by_key if k not in keys]
    differing = [k for k in keys if len({by_key.get(k) for by_key in overrides.values()}) > 1]
    labels = {}
    for run, info in run_infos.items():
        named = " ".join(overrides[run][k] for k in differing if k in overrides.get(run, {}))
        labels[run] = named or (info or {}).get("name") or run
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {run: label if counts[label] == 1 or label == run else f"{label} ({run})"
            for run, label in labels.items()}
