"""The ``rnnlab`` command.

    rnnlab train [overrides]             # train; Hydra's app: -m, --cfg job, --help, --info, -sc
    rnnlab list                          # every config group's options, with their descriptions
    rnnlab tensorboard <run or sweep>    # TensorBoard on it; prints the URL
    rnnlab report <runs or sweeps> --out report
    rnnlab bench --quick

Runs go under the working directory (``./outputs``), which is also put first on ``sys.path``, so
a cell of one's own (``my_cells/``) imports from there. ``RNNLAB_CONFIG_PATH`` or ``--config-dir``
adds one's own config directories (``my_conf/cell/<name>.yaml``).

``rnnlab <overrides>`` (the first word an override or a Hydra flag) is ``rnnlab train <overrides>``:
Lightning's DDP starts its other processes, and Hydra's shell completion asks for choices, by
running the same program with the overrides alone.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rnnlab import __version__
from rnnlab.config import CONF_URL

COMMANDS = ("train", "list", "tensorboard", "report", "bench")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        print("\n`rnnlab <command> --help` for each command's options.")
        return
    if args[0] == "--version":
        print(f"rnnlab {__version__}")
        return
    command, rest = args[0], args[1:]
    if command == "train":
        train(rest)
    elif command == "list":
        list_options(rest)
    elif command == "tensorboard":
        tensorboard(rest)
    elif command == "report":
        report(rest)
    elif command == "bench":
        bench(rest)
    elif re.match(r"[-+~]|[\w.@/]+=", command):
        train(args)
    else:
        print(f"rnnlab: no command {command!r}; the commands are {', '.join(COMMANDS)} "
              "(rnnlab --help)", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------- train

def train(args: list[str]) -> None:
    """Hydra's main over the packaged ``train.yaml``, with ``args`` as its command line."""
    from rnnlab.config import (
        check_config_files,
        exiting_on_config_error,
        register_resolvers,
        shadowed_config_files,
        user_config_dirs,
    )
    from rnnlab.searchpath import register

    register_resolvers(exit_on_error=True)
    exiting_on_config_error(user_config_dirs)()  # a bad RNNLAB_CONFIG_PATH, before Hydra starts
    exiting_on_config_error(check_config_files)(args)  # a YAML error would be Hydra's traceback
    if "COMP_LINE" not in os.environ and "LOCAL_RANK" not in os.environ:  # once, on a console
        for path, name in shadowed_config_files(args):
            print(f"Warning: {path} is not used: rnnlab's own {name} has its name and is found "
                  f"first; rename yours (a new name under {Path(name).parent}/)", file=sys.stderr)
    register()
    if os.getcwd() not in sys.path:  # the user's own package, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    if "COMP_LINE" in os.environ:  # a shell completion query: answer without importing torch
        choices = command_word_choices(os.environ["COMP_LINE"])
        if choices is not None:
            print(" ".join(choices))
            return
        os.environ["COMP_LINE"] = without_train_word(os.environ["COMP_LINE"])
    # Hydra reads its command line from sys.argv; DDP's other processes rerun sys.argv as is.
    sys.argv = [sys.argv[0], *args]
    run_job()


@hydra.main(version_base="1.3", config_path=CONF_URL, config_name="train")
def run_job(cfg: DictConfig) -> float:
    """One run, or one job of a multirun (in whichever process the launcher runs it).

    Exit status: 0 done; 2 a setting or file is wrong (the message names it, nothing was
    trained); 1 training failed (failed.json in the run directory; a full disk names the file);
    128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal stopped the run at a
    checkpoint.
    """
    from rnnlab.checkpointing import RunInterrupted
    from rnnlab.config import ConfigError
    from rnnlab.sweep import run

    quiet_console()
    try:
        return run(cfg)  # in a multirun, a failed job is recorded and returns a penalty
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as stop:
        print(f"Interrupted: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"Disk full: {error}", file=sys.stderr)
        sys.exit(1)


def quiet_console() -> None:
    """Lightning's lines plain on the console, and nothing a user of rnnlab cannot act on:
    Lightning's advertisement for its logging service, and a FutureWarning that Lightning's own
    code raises from torch."""
    import lightning_utilities.core.rank_zero as rank_zero
    import pytorch_lightning  # noqa: F401  (sets the logger that rank_zero logs to)

    for name in ("pytorch_lightning", "lightning_fabric"):
        # What Lightning does when imported before logging is set up, as it is here after Hydra
        # has set it up: its own plain handler, not Hydra's timestamped one.
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
    rank_zero.log.addFilter(not_an_advertisement)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            category=FutureWarning)


def not_an_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def without_train_word(line: str) -> str:
    """``rnnlab train cell=g`` → ``rnnlab cell=g``: Hydra completes the words after the program."""
    return re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line, count=1)


def command_word_choices(line: str) -> list[str] | None:
    """Completions that are not Hydra's: the command names while the word after ``rnnlab`` is
    typed, and none after a command other than ``train``; None: Hydra completes the line."""
    words = line.split()
    typed = len(words) if line[-1:].isspace() or not words else len(words) - 1
    if not words or not words[0].endswith("rnnlab"):
        return None  # `python scripts/train.py …`
    if typed == 1:
        word = words[1] if len(words) > 1 else ""
        if not re.match(r"[-+~]|[\w.@/]*=", word):
            return [c for c in COMMANDS if c.startswith(word)]
    elif words[1] in COMMANDS and words[1] != "train":
        return []
    return None


# ----------------------------------------------------------------------------------------- list

def list_options(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rnnlab list", description="Every config group and its options, each with the "
        "first sentence of its YAML header (rnnlab's configs, RNNLAB_CONFIG_PATH, --config-dir).")
    parser.add_argument("--config-dir", "-cd", action="append", default=[],
                        help="one more config directory, as for rnnlab train")
    options = parser.parse_args(args)
    from rnnlab.config import CONFIG_PATH_VARIABLE, ConfigError

    for directory in options.config_dir:
        if not Path(directory).is_dir():
            parser.error(f"--config-dir {directory}: not a directory")
    if options.config_dir:  # searched after RNNLAB_CONFIG_PATH's, as train's --config-dir is
        os.environ[CONFIG_PATH_VARIABLE] = os.pathsep.join(
            [os.environ.get(CONFIG_PATH_VARIABLE, ""), *options.config_dir])
    try:
        groups = config_groups()
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    print("Choose an option with <group>=<option>, e.g. rnnlab train cell=gru task=copy\n")
    width = max(len(name) for group in groups.values() for name in group) + 2
    for group, group_options in groups.items():
        print(group)
        for name, option in group_options.items():
            where = f"  [{option.source}]" if option.source else ""
            print(f"  {name:<{width}}{option.description}{where}")
            for path in option.hidden:
                print(f"  {'':<{width}}! {path} is not used: the option above has its name")
        print()


@dataclass
class ConfigOption:
    description: str
    source: str  # where the option is from, if not rnnlab's own configs
    hidden: list[str] = field(default_factory=list)  # later files of the same name


def config_groups() -> dict[str, dict[str, ConfigOption]]:
    """{group: {option: ConfigOption}}, sorted by name.

    Groups are those of rnnlab's configs and the user's directories. Options come from those, and
    for Hydra's own groups (``hydra/launcher``) from every source Hydra knows (its plugins'), in
    search-path order: the first source with a name is the one Hydra uses.
    """
    from hydra import initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from rnnlab.config import CONF_MODULE, CONF_URL, CONFIG_PATH_VARIABLE, register_resolvers
    from rnnlab.searchpath import register

    register_resolvers()
    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        sources = GlobalHydra.instance().config_loader().get_sources()
    GlobalHydra.instance().clear()
    own = [s for s in sources if s.full_path() == CONF_URL or s.provider == CONFIG_PATH_VARIABLE]

    def subgroups(source, parent: str) -> list[str]:
        names = [f"{parent}/{g}" if parent else g for g in source.list(parent, ObjectType.GROUP)]
        return [n for g in names for n in (g, *subgroups(source, g))]

    groups: dict[str, dict[str, ConfigOption]] = {}
    for group in sorted({g for source in own for g in subgroups(source, "")}):
        options: dict[str, ConfigOption] = {}
        for source in (sources if group.startswith("hydra/") else own):
            if not source.is_group(group):
                continue
            for name in source.list(group, ObjectType.CONFIG):
                path = f"{group}/{name}.yaml"
                if name in options:
                    options[name].hidden.append(f"{location(source)}/{path}")
                elif source.scheme() == "structured":  # registered by Hydra or a plugin
                    provider = ConfigStore.instance().load(path).provider
                    options[name] = ConfigOption(f"(registered by {provider})", "")
                else:
                    where = "" if source.full_path() == CONF_URL else location(source)
                    options[name] = ConfigOption(header_summary(config_text(source, path)), where)
        if options:
            groups[group] = dict(sorted(options.items()))
    return groups


def location(source) -> str:
    """A config source as a user names it: a directory's path, or Hydra's URL (pkg://…)."""
    return source.path if source.scheme() == "file" else source.full_path()


def config_text(source, path: str) -> str:
    """The YAML text of ``path`` in a file or package config source."""
    import importlib.resources

    if source.scheme() == "file":
        return Path(source.path, path).read_text()
    return importlib.resources.files(source.path).joinpath(path).read_text()


def header_summary(text: str) -> str:
    """The first sentence of a YAML's header comment: its prose lines (after any ``# @package``,
    before the indented command lines) up to the first sentence's end."""
    prose = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        words = line.lstrip("#").strip()
        if words.startswith("@package"):
            continue
        if not words:
            break
        prose.append(words)
    sentence_end = r"(?<!e\.g\.)(?<!i\.e\.)(?<!al\.)(?<!cf\.)(?<=[.?!])\s+(?=\D)"
    return re.split(sentence_end, " ".join(prose), maxsplit=1)[0]


# ---------------------------------------------------------------------------------- tensorboard

def tensorboard(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rnnlab tensorboard",
        description="TensorBoard on a run, a sweep (every job side by side) or outputs/.")
    parser.add_argument("logdir", type=Path, help="a run or sweep directory, or outputs/")
    parser.add_argument("--port", type=int, default=None,
                        help="default: 6006, or the next free port after it")
    parser.add_argument("--host", default="localhost",
                        help="the address to serve on (0.0.0.0: every network interface)")
    options = parser.parse_args(args)
    logdir = options.logdir.resolve()
    if not logdir.is_dir() or next(logdir.rglob("events.out.tfevents.*"), None) is None:
        print(f"TensorBoard error: no TensorBoard event files under {logdir}; give a run "
              "directory, a sweep directory or outputs/", file=sys.stderr)
        sys.exit(2)

    from tensorboard import program

    board = program.TensorBoard()
    # load_fast=false: TensorBoard's own reader in this process, not its experimental one
    board.configure(logdir=str(logdir), port=options.port, host=options.host, load_fast="false")
    url = board.launch()
    print(f"TensorBoard on {logdir}: {url}  (Ctrl+C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# ------------------------------------------------------------------------------ report, bench

def report(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rnnlab report",
        description="Compare finished runs: gradient-flow figures, one HTML page, and a table "
                    "of final metrics.")
    parser.add_argument("paths", nargs="+",
                        help="run directories, Hydra multirun directories, or outputs/")
    parser.add_argument("--out", default="report", help="where the PNGs and report.html go")
    parser.add_argument("--steps", type=int, nargs="*", default=None,
                        help="training steps whose profiles are drawn (default: 5 evenly spaced)")
    options = parser.parse_args(args)
    from rnnlab.report import NoRunsError, write_report
    from rnnlab.rundir import RunFileError

    try:
        page = write_report(options.paths, options.out, options.steps)
    except (NoRunsError, RunFileError) as error:
        print(f"Report error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"Report: {page}")


def bench(args: list[str]) -> None:
    from rnnlab import bench as benchmark

    sys.argv[0] = "rnnlab bench"  # the name its --help shows
    benchmark.main(args)


if __name__ == "__main__":
    main()
