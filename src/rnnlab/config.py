"""Config checks, where the configs are, and the run-directory resolvers.

Every user-facing error about a setting is a `ConfigError` that names the config key and the fix,
raised before training starts. Components check their own arguments with `require`, writing the
full key (`cell.hidden_size`) since a component always lives under its group.
"""

from __future__ import annotations

import difflib
import importlib.resources
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from rnnlab.malloc import MODES as MALLOC_MODES

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
    The directory runs go under is checked first, by ``${log_dir:...}`` (`checked_log_dir`).
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
    ``urnn_figure=lstm``); characters other than letters, digits and ``._,=+-`` become ``-``.
    A name longer than ``max_length`` keeps the whole overrides that fit, never part of a value
    (the job number in front keeps names unique; it stands alone if not even one fits).
    """
    name = re.sub(r"(^\d+_|^|,)[\w.]*/(?:[\w.]*/)*(\w+)@\w+=", r"\1\2=", name)
    number = re.match(r"^\d+_", name)
    head, rest = (number.group(0), name[number.end():]) if number else ("", name)
    items = [re.sub(r"[^A-Za-z0-9._,=+-]", "-", item) for item in top_level_items(rest)]
    kept: list[str] = []
    for item in items:
        if len((head + ",".join([*kept, item])).strip("_-")) > max_length:
            break
        kept.append(item)
    return (head + ",".join(kept)).strip("_-") or "job"


def top_level_items(overrides: str) -> list[str]:
    """``a=1,b=[0,1]`` → ``["a=1", "b=[0,1]"]``: split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(overrides):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth <= 0:
            items.append(overrides[start:i])
            start = i + 1
    items.append(overrides[start:])
    return [item for item in items if item]


def short_override(override: str) -> str:
    """``experiment/urnn_model@_global_=lstm`` → ``urnn_model=lstm``; others unchanged."""
    return re.sub(r"^[\w.]*/(?:[\w.]*/)*(\w+)@\w+=", r"\1=", override)


def checked_log_dir(log_dir: Any) -> str:
    """``${log_dir:${paths.log_dir}}``: the directory runs go under. Empty or null is an error:
    ``paths.log_dir=`` would otherwise put the runs at the filesystem's root."""
    require(isinstance(log_dir, (str, int)) and not isinstance(log_dir, bool)
            and str(log_dir).strip() != "", "paths.log_dir", log_dir,
            "a directory, relative to where you launch (default outputs) or absolute; empty "
            "would write runs at the filesystem's root")
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


def config_dirs(argv: list[str]) -> list[Path]:
    """The config directories a command line of ``rnnlab train`` reads: the packaged configs,
    ``RNNLAB_CONFIG_PATH``'s, and those given by ``--config-dir``/``-cd``,
    ``--config-path``/``-cp`` and ``hydra.searchpath``."""
    dirs = [CONF_DIR, *user_config_dirs()]
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd", "--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                dirs.append(Path(argv[i + 1]))
            elif arg.startswith(flag + "="):
                dirs.append(Path(arg.split("=", 1)[1]))
        if arg.startswith("hydra.searchpath="):
            entries = arg.split("=", 1)[1].strip("[]").split(",")
            dirs += [Path(e.strip().removeprefix("file://")) for e in entries
                     if e.strip() and "://" not in e.strip().removeprefix("file://")]
    return [d for d in dirs if d.is_dir()]


def check_config_files(argv: list[str]) -> None:
    """Every YAML file of the run's config directories parses: Hydra would show a syntax error
    in one as a traceback. The error names the file, the line and the problem."""
    import yaml

    for directory in config_dirs(argv):
        for path in sorted(directory.rglob("*.yaml")):
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise ConfigError(f"{path} is not valid YAML: {problem}{where}; fix the "
                                  "file") from None


def shadowed_config_files(argv: list[str]) -> list[tuple[Path, str]]:
    """The files of the user's config directories that a run cannot use: [(file, its name in
    rnnlab's configs)]. Hydra searches rnnlab's configs first, so a user's ``cell/indrnn.yaml``
    is never read once rnnlab has a ``cell/indrnn.yaml`` (a newer rnnlab may add one). With
    ``--config-path`` the user's directory replaces rnnlab's: nothing is shadowed."""
    if any(a in ("--config-path", "-cp") or a.startswith(("--config-path=", "-cp="))
           for a in argv):
        return []
    own = CONF_DIR.resolve()
    shadowed = []
    for directory in (d.resolve() for d in config_dirs(argv)[1:]):
        if directory == own:
            continue
        for path in sorted(directory.rglob("*.yaml")):
            name = path.relative_to(directory).as_posix()
            if (CONF_DIR / name).is_file():
                shadowed.append((path, name))
    return shadowed


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
    inside Lightning (or only once training has started, in every process).
    """
    validate_top_level(cfg)
    require_int("seed", cfg.get("seed"), minimum=0)
    ckpt_path = cfg.get("ckpt_path")
    require(ckpt_path is None or (isinstance(ckpt_path, str) and ckpt_path.strip() != ""),
            "ckpt_path", ckpt_path, "null (a new run), last, a run directory or a .ckpt file")
    validate_threads(cfg.get("threads", "auto"))
    flush = cfg.get("flush_denormal", False)
    require(isinstance(flush, bool), "flush_denormal", flush, "true or false")
    require_choice("malloc", cfg.get("malloc", "tuned"), MALLOC_MODES)
    validate_trainer(cfg.trainer, cfg.task)
    if cfg.get("monitor") is not None:
        require_int("monitor.every_n_steps", cfg.monitor.get("every_n_steps"), minimum=1)
    optimizer = cfg.model.get("optimizer") or {}
    require(isinstance(optimizer, (dict, DictConfig)), "model.optimizer", optimizer,
            "a mapping {name: adam|adamw|sgd|rmsprop, lr: ...}")
    lr = optimizer.get("lr")
    require(is_number(lr) and lr > 0, "model.optimizer.lr", lr, "a finite number > 0")
    validate_arguments(cfg)
    validate_output_paths(cfg)


# --- keys nobody reads ---------------------------------------------------------------------------
GROUPS = ("cell", "task", "model", "monitor", "trainer", "logger", "callbacks", "paths", "hydra",
          "experiment", "hparams_search", "debug")


def primary_keys() -> set[str]:
    """The top-level settings of conf/train.yaml, and the config groups."""
    return {str(k) for k in OmegaConf.load(CONF_DIR / "train.yaml") if k != "defaults"} | set(
        GROUPS)


def validate_top_level(cfg: DictConfig) -> None:
    """A ``+key=value`` override that adds a top-level key nothing reads is a typo (``+cel=rnn``
    for ``cell=rnn``): refused with the nearest known key. A key some interpolation reads
    (``+T=100`` with ``task.seq_len: ${T}``) is allowed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if overrides is None and HydraConfig.initialized():  # @hydra.main's cfg has no hydra node
        overrides = HydraConfig.get().overrides.task
    overrides = overrides or []
    known = primary_keys()
    text = OmegaConf.to_yaml({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                              if k != "hydra"})
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not (override.is_add() or override.is_force_add()) or override.package is not None:
            continue
        key = override.key_or_group.split(".")[0].split("/")[0]
        if key in known or re.search(r"\$\{\s*" + re.escape(key) + r"\b", text):
            continue
        close = difflib.get_close_matches(key, sorted(known - {"hydra"}), n=1)
        value = override.input_line.split("=", 1)[1] if "=" in override.input_line else "..."
        hint = (f" (did you mean {close[0]}? write {close[0]}{override.key_or_group[len(key):]}"
                f"={value})" if close else "")
        raise ConfigError(f"{key} is not a setting{hint}: {override.input_line} adds it at the "
                          f"top level, where nothing reads it; remove it")


# --- arguments of the components ------------------------------------------------------------------
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
TARGET_EXAMPLES = {"cell": "rnnlab.cells.rnn.ElmanRNN", "task": "rnnlab.tasks.adding.Adding",
                   "model": "rnnlab.model.RecurrentModel", "trainer": "pytorch_lightning.Trainer",
                   "monitor": "rnnlab.GradFlowCallback",
                   "logger": "pytorch_lightning.loggers.TensorBoardLogger",
                   "callbacks": "rnnlab.checkpointing.RunCheckpoint"}
# Arguments the code passes itself, not the config.
PASSED = {"cell": {"input_size"}, "model": {"cell", "input_size", "output_size", "n_out", "loss"},
          "trainer": {"callbacks", "logger"}}


def accepted_arguments(target: Any) -> set[str] | None:
    """The keyword arguments ``target`` accepts; None if it passes unknown ones on to code we do
    not know (``**kwargs`` outside rnnlab), so that nothing can be said."""
    names: set[str] = set()
    classes = target.__mro__ if isinstance(target, type) else (target,)
    for owner in classes:
        init = owner.__init__ if isinstance(target, type) else owner
        if isinstance(target, type) and "__init__" not in vars(owner):
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
        if not owner.__module__.startswith("rnnlab"):
            return None  # **kwargs handed to code outside rnnlab
    return None


def validate_component(key: str, node: Any) -> None:
    """``node`` (the config at ``key``) names an importable ``_target_`` and only its arguments."""
    from hydra.utils import get_object

    require(isinstance(node, DictConfig) and "_target_" in node, key,
            OmegaConf.to_container(node) if OmegaConf.is_config(node) else node,
            "a mapping with a _target_ (the class to build) and its arguments")
    try:
        target = get_object(node._target_)
    except Exception as error:
        why = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        example = TARGET_EXAMPLES.get(key.split(".")[0], "package.module.Class")
        raise ConfigError(f"{key}._target_={node._target_} cannot be imported ({why}); give "
                          f"an importable class such as {example} (set {key}._target_=...)"
                          ) from None
    accepted = accepted_arguments(target)
    if accepted is None:
        return
    accepted -= PASSED.get(key, set())
    for name in map(str, node):
        if name in HYDRA_KEYS or name in accepted:
            continue
        close = difflib.get_close_matches(name, sorted(accepted), n=1)
        hint = f" (did you mean {key}.{close[0]}?)" if close else ""
        takes = ", ".join(sorted(accepted)) or "no arguments"
        raise ConfigError(f"{key}.{name} is not an argument of {node._target_}{hint}; it takes "
                          f"{takes}; remove it (~{key}.{name})")


def validate_arguments(cfg: DictConfig) -> None:
    """Every component the run builds: its target exists and takes every key given to it."""
    for key in ("task", "cell", "model", "trainer", "monitor"):
        if key != "monitor" or cfg.get("monitor") is not None:
            validate_component(key, cfg.get(key))
    for group in ("callbacks", "logger"):
        nodes = cfg.get(group) or {}
        require(isinstance(nodes, DictConfig), group, nodes,
                "a mapping of name: {_target_: ..., arguments}")
        for name, node in nodes.items():
            if node is not None:
                validate_component(f"{group}.{name}", node)


# --- where the run writes ------------------------------------------------------------------------
def unwritable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be created and written as a directory (None if it can), without
    creating anything."""
    path = Path(os.path.abspath(path))
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                return f"{part} is a file, not a directory"
            if not os.access(part, os.W_OK | os.X_OK):
                return f"{part} is not writable (permissions, or a read-only filesystem)"
            return None
    return f"no part of {path} exists"


def validate_output_paths(cfg: DictConfig) -> None:
    """Every directory the run writes into can be created and written, before anything is."""
    keys = ["paths.output_dir", "monitor.dirpath", "trainer.default_root_dir"]
    keys += [f"callbacks.{name}.dirpath" for name in (cfg.get("callbacks") or {})]
    keys += [f"logger.{name}.save_dir" for name in (cfg.get("logger") or {})]
    for key in keys:
        path = OmegaConf.select(cfg, key, default=None)
        if path is None:
            continue
        require(isinstance(path, str) and path.strip() != "", key, path, "a directory")
        reason = unwritable_reason(Path(path))
        if reason is not None:
            setting = "paths.log_dir" if key == "paths.output_dir" else key
            raise ConfigError(f"{key}: cannot write to {path} ({reason}); choose a writable "
                              f"place (set {setting}=...)")


def validate_threads(threads: Any) -> int | str:
    """``threads``: ``auto`` or a number of torch threads."""
    require(threads == "auto" or is_int(threads, 1), "threads", threads,
            "auto or an integer >= 1")
    return threads


PRECISIONS = ("16", "32", "64", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "transformer-engine", "transformer-engine-float16")


def is_fraction(value: Any, zero: bool = False) -> bool:
    """A float in (0, 1], or [0, 1] with ``zero``."""
    return (isinstance(value, float) and math.isfinite(value)
            and (0.0 <= value if zero else 0.0 < value) and value <= 1.0)


def validate_trainer(trainer: DictConfig, task: DictConfig | None = None) -> None:
    """The Trainer keys users set (conf/trainer/), with the values Lightning accepts; with the
    task's config, also the checks that need its sizes (batches per epoch, batch size)."""
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
    require_int("trainer.num_nodes", trainer.get("num_nodes", 1))
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
    for key in ("enable_progress_bar", "enable_model_summary", "deterministic", "detect_anomaly",
                "benchmark"):
        value = trainer.get(key, False)
        warn_ok = key == "deterministic" and value in (None, "warn")  # Lightning accepts these
        require(isinstance(value, bool) or warn_ok or (key == "benchmark" and value is None),
                f"trainer.{key}", value, "true or false")
    require_int("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1))
    fast = trainer.get("fast_dev_run", False)
    require(isinstance(fast, bool) or is_int(fast, 0), "trainer.fast_dev_run", fast,
            "true, false or a number of batches >= 0")
    precision = trainer.get("precision", "32-true")
    require(str(precision) in PRECISIONS, "trainer.precision", precision,
            "one of " + ", ".join(PRECISIONS))
    limit = trainer.get("limit_train_batches")
    require(limit is None or is_int(limit, 1) or is_fraction(limit),
            "trainer.limit_train_batches", limit,
            "null, an integer >= 1 or a fraction in (0, 1] (0 would train nothing)")
    limit_val = trainer.get("limit_val_batches")
    # 0: no validation (a benchmark's choice): no val/loss, last.ckpt only at the last step,
    # every_n_train_steps and a signal.
    require(limit_val is None or is_int(limit_val, 0) or is_fraction(limit_val),
            "trainer.limit_val_batches", limit_val,
            "null, an integer >= 0 (0: no validation) or a fraction in (0, 1]")
    overfit = trainer.get("overfit_batches", 0)
    require(is_int(overfit, 0) or is_fraction(overfit, zero=True), "trainer.overfit_batches",
            overfit, "an integer >= 0 or a fraction in [0, 1]")
    interval = trainer.get("val_check_interval")
    require(interval is None or is_int(interval, 1) or is_fraction(interval),
            "trainer.val_check_interval", interval,
            "null, a number of training batches >= 1 or a fraction of an epoch in (0, 1]")
    if task is None:
        return
    batches = task.get("train_batches")
    if is_int(interval, 1) and is_int(batches, 1) and trainer.get("check_val_every_n_epoch", 1):
        per_epoch = (min(batches, limit) if is_int(limit, 1) else
                     max(int(batches * limit), 1) if is_fraction(limit) else batches)
        require(interval <= per_epoch, "trainer.val_check_interval", interval,
                f"at most the {per_epoch} training batches of an epoch (task.train_batches"
                f"{', trainer.limit_train_batches' if limit is not None else ''}); validate "
                "every few epochs with trainer.check_val_every_n_epoch")
    world = processes(trainer)
    batch_size = task.get("batch_size")
    if world > 1 and is_int(batch_size, 1):
        require(batch_size % world == 0, "task.batch_size", batch_size,
                f"a multiple of the {world} processes (trainer.devices x trainer.num_nodes) "
                "that share each batch")


def processes(trainer: DictConfig) -> int:
    """How many data-parallel processes the trainer starts (1 when Lightning decides)."""
    devices = trainer.get("devices", "auto")
    count = len(devices) if isinstance(devices, (list, ListConfig)) else (
        devices if is_int(devices, 1) else 1)
    accelerator = trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and is_int(count, 1):
        import torch

        visible = torch.cuda.device_count()
        require(count <= visible, "trainer.devices", devices,
                f"at most the {visible} GPU(s) visible here (or trainer.accelerator=cpu)")
    nodes = trainer.get("num_nodes", 1)
    return count * (nodes if is_int(nodes, 1) else 1)


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
