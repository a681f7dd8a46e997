"""The ``rnnlab`` command as a user runs it: the console script of this environment, in a
directory of its own."""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from rnnlab import gradflow
from rnnlab.cli import command_word_choices, header_summary, without_train_word
from rnnlab.config import ConfigError, checked_log_dir, shadowed_config_files
from rnnlab.train import train as train_in_process

from .conftest import CONF

RNNLAB = Path(sys.executable).parent / "rnnlab"  # the console script installed with the package
TINY = ["trainer.max_steps=2", "task.seq_len=6", "task.batch_size=4", "task.train_batches=2",
        "task.val_batches=1", "cell.hidden_size=8", "model.encoder_size=4",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "monitor.every_n_steps=1"]


def rnnlab(*args: str, cwd: Path, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "RNNLAB_CONFIG_PATH")}
    return subprocess.run([str(RNNLAB), *args], cwd=cwd, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def yaml_header_line(path: Path) -> str:
    """The first comment line of a config that is not ``# @package``."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("#").strip()
    return ""


def listed(output: str) -> dict[str, dict[str, str]]:
    """``rnnlab list``'s output → {group: {option: the rest of its line}}."""
    groups: dict[str, dict[str, str]] = {}
    group = None
    for line in output.splitlines():
        if re.match(r"[\w/]+$", line):
            group = groups.setdefault(line, {})
        elif group is not None and re.match(r"  \w", line):
            name, _, rest = line.strip().partition(" ")
            group[name] = rest.strip()
        elif group is not None and line.strip().startswith("!"):
            group[f"! {len(group)}"] = line.strip()
    return groups


def user_conf(directory: Path) -> Path:
    """A config directory with a cell of its own and one that reuses rnnlab's name ``rnn``."""
    (directory / "my_conf" / "cell").mkdir(parents=True)
    (directory / "my_conf" / "cell" / "mine.yaml").write_text(
        "# My cell: the Elman RNN under another name.\n#   rnnlab train cell=mine\n"
        "_target_: rnnlab.cells.rnn.ElmanRNN\nhidden_size: 8\n")
    (directory / "my_conf" / "cell" / "rnn.yaml").write_text(
        "# Not used: rnnlab has a cell named rnn.\n_target_: nowhere.Cell\n")
    return directory / "my_conf"


# ------------------------------------------------------------------------------------------ list

def test_list_shows_every_config_in_conf_with_its_header(tmp_path):
    result = rnnlab("list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    groups = listed(result.stdout)
    expected = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)
    assert expected, "conf/ holds no group options"
    for path in expected:
        group, name = path.parent.relative_to(CONF).as_posix(), path.stem
        assert name in groups.get(group, {}), f"{group}/{name} is not listed"
        shown, header = groups[group][name], yaml_header_line(path)
        assert shown and (header.startswith(shown) or shown.startswith(header)), \
            f"{group}/{name}: listed {shown!r}, header {header!r}"
    own = {(p.parent.relative_to(CONF).as_posix(), p.stem) for p in expected}
    listed_pairs = {(g, n) for g, options in groups.items() for n in options}
    plugins = {(g, n) for g, n in listed_pairs if g == "hydra/launcher"} - own
    assert listed_pairs - plugins == own  # nothing else: Hydra's plugins add only launchers


def test_list_shows_the_launchers_that_hydra_plugins_register(tmp_path):
    launchers = listed(rnnlab("list", cwd=tmp_path).stdout)["hydra/launcher"]
    assert {"basic", "joblib", "slurm"} <= set(launchers)
    assert launchers["joblib"] == "(registered by joblib_launcher)"


def test_list_adds_a_user_directory_and_marks_a_name_rnnlab_already_has(tmp_path):
    my_conf = user_conf(tmp_path).resolve()
    for args, env in ((["list"], {"RNNLAB_CONFIG_PATH": "my_conf"}),
                      (["list", "--config-dir", "my_conf"], None)):
        result = rnnlab(*args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        cells = listed(result.stdout)["cell"]
        assert cells["mine"] == f"My cell: the Elman RNN under another name.  [{my_conf}]"
        assert cells["rnn"] == yaml_header_line(CONF / "cell" / "rnn.yaml")
        assert f"! {my_conf}/cell/rnn.yaml is not used" in result.stdout


def test_header_summary_is_the_first_sentence_of_the_header_prose():
    text = ("# @package _global_\n# Gain sweep: W = g·Q (Le et al. 2015) for g = 0.8 … 1.2 on\n"
            "# the adding problem. Shows the decay\n# rate.\n#   rnnlab train -m experiment=x\n"
            "seed: 0\n")
    assert header_summary(text) == \
        "Gain sweep: W = g·Q (Le et al. 2015) for g = 0.8 … 1.2 on the adding problem."
    assert header_summary("_target_: x\n") == ""


# ----------------------------------------------------------------------------------------- train

def test_default_run_console_is_clean_and_ends_with_the_run_and_its_tensorboard_command(
        tmp_path):
    result = rnnlab("train", *TINY, cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs" / "adding" / "rnn").iterdir()
    assert (run / "metrics.json").is_file()
    console = result.stdout + result.stderr
    assert "litlogger" not in console
    assert not re.search(r"\w+Warning\b", console), console  # none, deprecations included
    assert result.stdout.rstrip().splitlines()[-2:] == [
        f"Run directory: {run}", f"TensorBoard:   rnnlab tensorboard {run}"]


def test_config_dir_and_package_from_the_working_directory_train(tmp_path):
    """--config-dir adds the YAML (RNNLAB_CONFIG_PATH: tests/test_user_cell.py); the package
    imports from the working directory without PYTHONPATH."""
    (tmp_path / "my_conf" / "cell").mkdir(parents=True)
    (tmp_path / "my_conf" / "cell" / "local.yaml").write_text(
        "# A cell from the working directory's package.\n_target_: my_cells.local.Local\n"
        "hidden_size: 8\n")
    (tmp_path / "my_cells").mkdir()
    (tmp_path / "my_cells" / "local.py").write_text(
        "from rnnlab.cells.rnn import ElmanRNN\n\n\nclass Local(ElmanRNN):\n    pass\n")
    result = rnnlab("train", "--config-dir", "my_conf", "cell=local", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "adding" / "local").iterdir()
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["cell"]["_target_"] == "my_cells.local.Local"
    assert gradflow.load(run)["step"].tolist() == [0, 1]


def test_train_warns_that_a_user_file_with_a_name_rnnlab_has_is_not_used(tmp_path):
    my_conf = user_conf(tmp_path).resolve()
    warning = (f"Warning: {my_conf}/cell/rnn.yaml is not used: rnnlab's own cell/rnn.yaml has "
               "its name and is found first; rename yours (a new name under cell/)")
    for args, env in ((["cell=rnn"], {"RNNLAB_CONFIG_PATH": "my_conf"}),
                      (["--config-dir", "my_conf", "cell=rnn"], None)):
        shown = rnnlab("train", "--cfg", "job", *args, cwd=tmp_path, env=env)
        assert shown.returncode == 0, shown.stderr
        assert shown.stderr.splitlines() == [warning]
        # what Hydra composes is rnnlab's cell, as the warning says
        assert yaml.safe_load(shown.stdout)["cell"] == \
            yaml.safe_load((CONF / "cell" / "rnn.yaml").read_text())
    alone = rnnlab("train", "--cfg", "job", "cell=rnn", cwd=tmp_path)
    assert alone.returncode == 0 and "Warning" not in alone.stderr


def test_nothing_is_shadowed_when_the_users_directory_replaces_rnnlabs(tmp_path):
    my_conf = user_conf(tmp_path).resolve()
    assert shadowed_config_files(["--config-dir", str(my_conf)]) == [
        (my_conf / "cell" / "rnn.yaml", "cell/rnn.yaml")]
    assert shadowed_config_files(["--config-path", str(my_conf)]) == []
    assert shadowed_config_files(["-cp", str(my_conf), "-cd", str(my_conf)]) == []


def test_a_missing_config_path_directory_is_a_config_error(tmp_path):
    result = rnnlab("train", cwd=tmp_path, env={"RNNLAB_CONFIG_PATH": "nowhere"})
    assert result.returncode == 2
    assert (f"Config error: RNNLAB_CONFIG_PATH: {tmp_path / 'nowhere'} is not a directory"
            in result.stderr)
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()


def test_an_empty_log_dir_is_a_config_error_not_the_filesystem_root(tmp_path):
    result = rnnlab("train", "paths.log_dir=", cwd=tmp_path)
    assert result.returncode == 2
    assert "Config error: paths.log_dir must be a directory" in result.stderr
    assert "(set paths.log_dir=...)" in result.stderr and "Traceback" not in result.stderr


def test_checked_log_dir_refuses_empty_and_null_and_keeps_a_path():
    assert checked_log_dir("outputs") == "outputs"
    assert checked_log_dir("/scratch/runs") == "/scratch/runs"
    for value in ("", "  ", None, True):
        with pytest.raises(ConfigError, match="paths.log_dir must be a directory"):
            checked_log_dir(value)


def test_hydra_flags_behave_as_hydras(tmp_path):
    gru = yaml.safe_load((CONF / "cell" / "gru.yaml").read_text())
    shown = rnnlab("train", "--cfg", "job", "cell=gru", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["cell"] == gru
    implicit = rnnlab("--cfg", "job", "cell=gru", cwd=tmp_path)  # `train` implied
    assert implicit.stdout == shown.stdout

    cells = ", ".join(sorted(p.stem for p in (CONF / "cell").glob("*.yaml")))
    helped = rnnlab("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and f"cell: {cells}" in helped.stdout

    my_conf = user_conf(tmp_path).resolve()
    info = rnnlab("train", "--info", "searchpath", cwd=tmp_path,
                  env={"RNNLAB_CONFIG_PATH": "my_conf"})
    rows = [line for line in info.stdout.splitlines() if line.startswith("|")]
    assert [r.split("|")[2].strip() for r in rows[1:]] == [
        "pkg://hydra.conf", "pkg://rnnlab.conf", f"file://{my_conf}", "structured://"]
    assert not (tmp_path / "outputs").exists()  # none of these trains


def test_bash_completion_offers_the_commands_and_the_config_options(tmp_path):
    def complete(line: str) -> list[str]:
        script = (f'eval "$({RNNLAB} train -sc install=bash)"; COMP_LINE="{line}"; '
                  'COMP_POINT=${#COMP_LINE}; words=($COMP_LINE); '
                  'COMP_CWORD=$(( ${#words[@]} - 1 )); '
                  '[[ "$COMP_LINE" == *" " ]] && COMP_CWORD=${#words[@]}; '
                  'hydra_bash_completion; '
                  'echo "${COMPREPLY[@]}"')
        env = {**os.environ, "PATH": os.pathsep.join([str(RNNLAB.parent), os.environ["PATH"]])}
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return sorted(result.stdout.split())

    cells = sorted(f"cell={p.stem}" for p in (CONF / "cell").glob("*.yaml"))
    assert complete("rnnlab train cell=") == cells
    assert complete("rnnlab train cell=l") == [c for c in cells if c.startswith("cell=l")]
    assert complete("rnnlab tr") == ["train"]
    assert complete("rnnlab ") == sorted(["train", "list", "tensorboard", "report", "bench"])
    assert complete("rnnlab list --c") == []  # not a Hydra command line


def test_command_word_choices_leave_override_words_to_hydra():
    assert command_word_choices("rnnlab te") == ["tensorboard"]
    assert command_word_choices("rnnlab cell=") is None  # `rnnlab <overrides>` is train
    assert command_word_choices("rnnlab train cell=") is None
    assert command_word_choices("python scripts/train.py ") is None


def test_without_train_word_leaves_what_hydra_completes():
    assert without_train_word("rnnlab train cell=g") == "rnnlab cell=g"
    assert without_train_word("rnnlab train") == "rnnlab"
    assert without_train_word("python scripts/train.py cell=g") == \
        "python scripts/train.py cell=g"
    assert without_train_word("rnnlab trainer=ddp") == "rnnlab trainer=ddp"


# ----------------------------------------------------------------------------------- tensorboard

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_line(process: subprocess.Popen, seconds: float = 120) -> str:
    """The first line the process prints, or '' if it prints none within ``seconds``."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=seconds)
    except queue.Empty:
        return ""


@pytest.mark.parametrize("port", ["free", "default"])
def test_tensorboard_serves_the_run_at_the_url_it_prints(make_cfg, tmp_path, port):
    train_in_process(make_cfg("task.seq_len=6", "trainer.max_steps=2"))
    run = tmp_path / "run"
    args = ["--port", str(free_port())] if port == "free" else []
    server = subprocess.Popen([str(RNNLAB), "tensorboard", str(run), *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first_line(server)
        match = re.fullmatch(rf"TensorBoard on {re.escape(str(run))}: "
                             r"(http://localhost:(\d+)/)  \(Ctrl\+C stops it\)\n", line)
        assert match, f"printed {line!r}; stderr: {server.stderr.read() if not line else ''}"
        url, served_port = match.groups()
        if port == "free":
            assert served_port == args[1]
        with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=60) as response:
            tags = json.loads(response.read())
        (run_tags,) = tags.values()
        assert {"grad_flow/decay_rate", "grad_flow/horizon"} <= set(run_tags)
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_tensorboard_on_a_directory_without_runs_says_so(tmp_path):
    result = rnnlab("tensorboard", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"TensorBoard error: no TensorBoard event files under {tmp_path}" in result.stderr


# ------------------------------------------------------------------------- report, bench, main

def test_report_names_a_path_without_runs(tmp_path):
    result = rnnlab("report", str(tmp_path), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"Report error: no runs under {tmp_path}" in result.stderr


def test_bench_help_is_the_benchmarks(tmp_path):
    result = rnnlab("bench", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: rnnlab bench") and "--quick" in result.stdout


def test_version_is_the_installed_distributions(tmp_path):
    result = rnnlab("--version", cwd=tmp_path)
    assert result.stdout.strip() == f"rnnlab {importlib.metadata.version('rnnlab')}"


def test_an_unknown_command_lists_the_commands(tmp_path):
    result = rnnlab("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert "no command 'trian'; the commands are train, list, tensorboard, report, bench" \
        in result.stderr
    assert "rnnlab train" in rnnlab("--help", cwd=tmp_path).stdout
