"""Config checks, where the configs are, and the run-directory resolvers.

Every user-facing error about a setting is a `ConfigError` that names the config key and the fix,
raised before training starts. Components check their own arguments with `require`, writing the
full key (`cell.hidden_size`) since a component always lives under its group.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

# The configs are the package rnnlab.conf: the build installs the repository's conf/ under that
# name, in a wheel and in an editable install alike (docs/packaging.md).
CONF_MODULE = "rnnlab.conf"
CONF_URL = f"pkg://{CONF_MODULE}"
# More config directories (cell/, task/, experiment/ …), os.pathsep-separated, searched after
# rnnlab's own (rnnlab.searchpath).
CONFIG_PATH_VARIABLE = "RNNLAB_CONFIG_PATH"


class ConfigError(ValueError):
    """A setting is invalid; the message names the key, the value and the fix."""


def packaged_conf_dir() -> Path:
    """The directory of the package rnnlab.conf."""
    try:
        return Path(str(importlib.resources.files(CONF_MODULE)))
    except ModuleNotFoundError:
        raise ImportError(f"{CONF_MODULE} is not installed: this rnnlab was installed before its "
                          "configs became part of the package; reinstall it "
                          "(pip install -e . in a checkout)") from None


CONF_DIR = packaged_conf_dir()


def user_config_dirs() -> list[Path]:
    """The directories named by ``RNNLAB_CONFIG_PATH`` (relative ones from the working directory);
    one that is not a directory is a ConfigError."""
    dirs = []
    for entry in os.environ.get(CONFIG_PATH_VARIABLE, "").split(os.pathsep):
        if not entry:
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"{CONFIG_PATH_VARIABLE}: {path} is not a directory; set "
                              f"{CONFIG_PATH_VARIABLE} to directories holding cell/, task/ … "
                              f"(several separated by '{os.pathsep}')")
        dirs.append(path)
    return dirs


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Unless `condition`: ConfigError('<key> must be <allowed>, got <value> (set <key>=...)')."""
    if not condition:
        raise ConfigError(f"{key} must be {allowed}, got {value!r} (set {key}=...)")


def is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require_int(key: str, value: Any, minimum: int = 1) -> int:
    require(is_int(value, minimum), key, value, f"an integer >= {minimum}")
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
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"paths.log_dir: cannot create {base.parent} ({error.strerror}); "
                          "choose a writable place (set paths.log_dir=...)") from None
    for n in range(10_000):
        path = base if n == 0 else base.with_name(f"{base.name}_{n}")
        try:
            os.mkdir(path)
            return str(path)
        except FileExistsError:
            continue
        except OSError as error:
            raise ConfigError(f"paths.log_dir: cannot create {path} ({error.strerror}); "
                              "choose a writable place (set paths.log_dir=...)") from None
    raise RuntimeError(f"could not create a fresh run directory next to {base}")


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
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


def checked_log_dir(log_dir: Any) -> str:
    """``${log_dir:${paths.log_dir}}``: the directory runs go under. Empty or null is an error:
    ``paths.log_dir=`` would otherwise put the runs at the filesystem's root."""
    require(isinstance(log_dir, (str, int)) and not isinstance(log_dir, bool)
            and str(log_dir).strip() != "", "paths.log_dir", log_dir,
            "a directory, relative to where you launch (default outputs) or absolute")
    return str(log_dir)


def register_resolvers(exit_on_error: bool = False) -> None:
    """``${unique_dir:...}`` for run and sweep directories, ``${log_dir:...}`` for the directory
    they go under, ``${safe_dirname:...}`` for jobs.

    ``exit_on_error`` (the console commands): Hydra resolves the run directory before any of our
    code runs and would show a ConfigError there under its own traceback; instead print it and
    exit (2).
    """
    for name, resolver, cached in (("unique_dir", claim_unique_dir, True),
                                   ("log_dir", checked_log_dir, False)):
        if not OmegaConf.has_resolver(name):
            resolver = exiting_on_config_error(resolver) if exit_on_error else resolver
            OmegaConf.register_new_resolver(name, resolver, use_cache=cached)
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)


def exiting_on_config_error(function):
    """``function``, printing a `ConfigError` as ``Config error: …`` and exiting with status 2."""
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ConfigError as error:
            print(f"Config error: {error}", file=sys.stderr)
            sys.exit(2)

    return call


def compose_config(overrides: list[str], output_dir: str | Path,
                   config_name: str = "train") -> DictConfig:
    """Compose ``<config_name>.yaml`` as ``rnnlab train`` would, writing into output_dir.

    For tests, benchmarks and notebooks: no Hydra run directory is made; ``paths.output_dir``
    is set to ``output_dir``. The directories of ``RNNLAB_CONFIG_PATH`` are searched too.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from rnnlab import searchpath

    register_resolvers()
    searchpath.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def validate(cfg: DictConfig) -> None:
    """Checks across groups, before anything is built (each component checks its own args).

    The Trainer is Lightning's, so its keys are checked here: a bad one would otherwise fail
    inside Lightning (or only once training has started).
    """
    require_int("seed", cfg.get("seed"), minimum=0)
    validate_threads(cfg.get("threads", "auto"))
    flush = cfg.get("flush_denormal", False)
    require(isinstance(flush, bool), "flush_denormal", flush, "true or false")
    validate_trainer(cfg.trainer)
    if cfg.get("monitor") is not None:
        require_int("monitor.every_n_steps", cfg.monitor.get("every_n_steps"), minimum=1)
    optimizer = cfg.model.get("optimizer") or {}
    require(isinstance(optimizer, (dict, DictConfig)), "model.optimizer", optimizer,
            "a mapping {name: adam|adamw|sgd|rmsprop, lr: ...}")
    lr = optimizer.get("lr")
    require(is_number(lr) and lr > 0, "model.optimizer.lr", lr, "a finite number > 0")


def validate_threads(threads: Any) -> int | str:
    """``threads``: ``auto`` or a number of torch threads."""
    require(threads == "auto" or is_int(threads, 1), "threads", threads,
            "auto or an integer >= 1")
    return threads


def validate_trainer(trainer: DictConfig) -> None:
    """The Trainer keys users set (conf/trainer/), with the values Lightning accepts."""
    max_steps = trainer.get("max_steps", -1)
    require(max_steps == -1 or is_int(max_steps, 1),
            "trainer.max_steps", max_steps, "-1 (no limit) or an integer >= 1")
    max_epochs = trainer.get("max_epochs")
    require(max_epochs is None or max_epochs == -1 or is_int(max_epochs, 1),
            "trainer.max_epochs", max_epochs, "null, -1 (no limit) or an integer >= 1")
    require_choice("trainer.accelerator", trainer.get("accelerator", "auto"), ACCELERATORS)
    devices = trainer.get("devices", "auto")
    require(devices in ("auto", -1) or is_int(devices, 1)
            or (isinstance(devices, (list, ListConfig)) and len(devices) > 0
                and all(is_int(d, 0) for d in devices)),
            "trainer.devices", devices, "auto, -1 (all), an integer >= 1 or a list of device ids")
    clip = trainer.get("gradient_clip_val")
    require(clip is None or (is_number(clip) and clip >= 0), "trainer.gradient_clip_val", clip,
            "null (no clipping) or a finite number >= 0")
    require_choice("trainer.gradient_clip_algorithm",
                   trainer.get("gradient_clip_algorithm") or "norm", ("norm", "value"))
    for key in ("log_every_n_steps", "check_val_every_n_epoch"):
        value = trainer.get(key, 1)
        require(value is None or is_int(value, 1), f"trainer.{key}", value, "an integer >= 1")
    require_int("trainer.num_sanity_val_steps", trainer.get("num_sanity_val_steps", 0),
                minimum=-1)
    for key in ("enable_progress_bar", "enable_model_summary", "deterministic"):
        value = trainer.get(key, False)
        warn_ok = key == "deterministic" and value in (None, "warn")  # Lightning accepts these
        require(isinstance(value, bool) or warn_ok, f"trainer.{key}", value, "true or false")


def validate_timesteps(timesteps: Any, seq_len: int) -> None:
    """``monitor.timesteps`` must lie in [-T, T) for the task's T (negative: from the end)."""
    require(timesteps is None or (isinstance(timesteps, (list, ListConfig)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in timesteps)),
        "monitor.timesteps", timesteps, "null or a list of integers")
    if timesteps:
        outside = [t for t in timesteps if not -seq_len <= t < seq_len]
        require(not outside, "monitor.timesteps", list(timesteps),
                f"timesteps in [-{seq_len}, {seq_len - 1}] for the task's T = {seq_len} "
                f"(negative count from the end); out of range: {outside}")


def check_writable(output_dir: str | Path) -> None:
    """Create the run directory now, so an unwritable place fails before training."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"paths.output_dir: cannot write to {path} ({error.strerror}); "
                          f"choose a writable place (set paths.log_dir=...)") from None
