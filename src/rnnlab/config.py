"""Config checks and the run-directory resolver.

Every user-facing error about a setting is a `ConfigError` that names the config key and the fix,
raised before training starts. Components check their own arguments with `require`, writing the
full key (`cell.hidden_size`) since a component always lives under its group.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# The configs ship with the repository, beside src/ (an editable install finds them there).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A setting is invalid; the message names the key, the value and the fix."""


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Unless `condition`: ConfigError('<key> must be <allowed>, got <value> (set <key>=...)')."""
    if not condition:
        raise ConfigError(f"{key} must be {allowed}, got {value!r} (set {key}=...)")


def require_int(key: str, value: Any, minimum: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, key, value, f"an integer >= {minimum}")
    return value


def require_choice(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    require(value in choices, key, value, "one of " + ", ".join(map(str, choices)))
    return value


def claim_unique_dir(candidate: str) -> str:
    """Create `candidate` (or `candidate_1`, `candidate_2`, …) atomically and return its path.

    Used as the `${unique_dir:...}` resolver for Hydra's run and sweep directories, so two runs
    started in the same second never share (and overwrite) a directory. Registered with
    `use_cache=True`: each config resolves it once, and Hydra copies the cache into each job.
    """
    base = Path(candidate)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        path = base if n == 0 else base.with_name(f"{base.name}_{n}")
        try:
            os.mkdir(path)
            return str(path)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory next to {base}")


MAX_DIRNAME = 120  # well below the 255-byte limit of common filesystems


def safe_dirname(name: str, max_length: int = MAX_DIRNAME) -> str:
    """A job directory name from ``<num>_<override_dirname>``, safe on any filesystem.

    Nested-group keys lose their path and package (``experiment/urnn_figure@_global_=lstm`` →
    ``urnn_figure=lstm``); characters other than letters, digits and ``._,=+-`` become ``-``;
    names are cut to ``max_length`` (the job number in front keeps them unique).
    """
    name = re.sub(r"(^\d+_|^|,)[\w.]*/(?:[\w.]*/)*(\w+)@\w+=", r"\1\2=", name)
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "-", name).strip("_-")
    return name[:max_length] or "job"


def short_override(override: str) -> str:
    """``experiment/urnn_model@_global_=lstm`` → ``urnn_model=lstm``; others unchanged."""
    return re.sub(r"^[\w.]*/(?:[\w.]*/)*(\w+)@\w+=", r"\1=", override)


def register_resolvers() -> None:
    """``${unique_dir:...}`` for run and sweep directories, ``${safe_dirname:...}`` for jobs."""
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", claim_unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)


def compose_config(overrides: list[str], output_dir: str | Path,
                   config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as `scripts/train.py` would, writing into output_dir.

    For tests, benchmarks and notebooks: no Hydra run directory is made; ``paths.output_dir``
    is set to ``output_dir``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks across groups, before anything is built (each component checks its own args)."""
    require_int("seed", cfg.get("seed"), minimum=0)
    trainer = cfg.trainer
    max_steps = trainer.get("max_steps", -1)
    require(isinstance(max_steps, int) and (max_steps == -1 or max_steps >= 1),
            "trainer.max_steps", max_steps, "-1 (no limit) or an integer >= 1")
    if cfg.get("monitor") is not None:
        require_int("monitor.every_n_steps", cfg.monitor.get("every_n_steps"), minimum=1)
    optimizer = cfg.model.get("optimizer", {})
    lr = optimizer.get("lr")
    require(isinstance(lr, (int, float)) and lr == lr and 0 < lr < float("inf"),
            "model.optimizer.lr", lr, "a finite number > 0")
