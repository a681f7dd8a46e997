"""The README's "Add your own cell" example, copied as is outside the package, trains with the
README's command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import gradflow

from .conftest import ROOT

# "`<path>`:" then a fenced block: the file the README tells the user to write.
FILE_BLOCK = re.compile(r"^`([\w./-]+)`:\n\n```(?:python|yaml)\n(.*?)^```", re.M | re.S)
# The command the README runs it with: the bash block after "Run it from the directory …".
COMMAND_BLOCK = re.compile(r"^Run it from .*?```bash\n(.*?)\n```", re.M | re.S)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def readme_command() -> str:
    (command,) = COMMAND_BLOCK.findall(readme_section("Add your own cell"))
    return command


def train_readme_example(directory, *overrides: str) -> subprocess.CompletedProcess:
    """Write the README's files into ``directory`` and run the README's command there, with
    ``overrides`` after it: the installed ``rnnlab``, no PYTHONPATH, no path to rnnlab."""
    for path, text in FILE_BLOCK.findall(readme_section("Add your own cell")):
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(text)
    bin_dir = Path(sys.executable).parent  # where this environment's `rnnlab` is installed
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "RNNLAB_CONFIG_PATH")}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return subprocess.run(["bash", "-c", f"{readme_command()} {shlex.join(overrides)}"],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=600)


def test_readme_names_the_files_and_the_command_the_test_uses():
    section = readme_section("Add your own cell")
    assert [path for path, _ in FILE_BLOCK.findall(section)] == [
        "my_cells/leaky.py", "my_conf/cell/leaky.yaml"]
    assert readme_command().startswith("RNNLAB_CONFIG_PATH=my_conf rnnlab train cell=leaky")
    assert "<rnnlab>" not in section and "PYTHONPATH" not in section  # no rnnlab path anywhere


def test_readme_user_cell_example_trains_from_its_own_package_and_config_dir(tmp_path):
    T = int(re.search(r"task\.seq_len=(\d+)", readme_command()).group(1))
    result = train_readme_example(
        tmp_path, "trainer.max_steps=3", "monitor.every_n_steps=1",
        "task.batch_size=4", "task.train_batches=2", "task.val_batches=1", "cell.hidden_size=8",
        "model.encoder_size=4", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.num_sanity_val_steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is not used" not in result.stderr

    (run,) = (tmp_path / "outputs" / "adding" / "leaky").iterdir()
    # the user's class trained, not a cell of rnnlab's that has the same name
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["cell"]["_target_"] \
        == "my_cells.leaky.LeakyRNN"
    record = gradflow.load(run)
    assert record["step"].tolist() == [0, 1, 2]
    assert record["dL_dz"].shape == (3, T) and (record["dL_dz"] > 0).all()
    assert np.isfinite(record["decay_rate"]).all()
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"grad_flow/decay_rate", "grad_flow/horizon"} <= set(events.Tags()["scalars"])


def test_readme_user_cell_rejects_a_bad_setting_before_training(tmp_path):
    result = train_readme_example(tmp_path, "cell.leak=0")
    assert result.returncode == 2
    assert "cell.leak must be a number in (0, 1], got 0 (set cell.leak=...)" in result.stderr
    assert not list(tmp_path.rglob("grad_flow/*.npz"))  # stopped before the first step
