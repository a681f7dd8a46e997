"""Release hygiene: the sdist and the wheel hold everything, the version is written once, and the
wheel installed into a fresh environment trains, reports and lists from any directory."""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

import rnnlab

from .conftest import CONF, ROOT
from .test_cli import first_line, free_port

SOURCES = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py"))
CONFIGS = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
# Package data under src/: the TensorBoard plugin's frontend (static/).
DATA = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "rnnlab").rglob("*")
              if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)
TINY = ["trainer.max_steps=2", "task.seq_len=6", "task.batch_size=4", "task.train_batches=2",
        "task.val_batches=1", "cell.hidden_size=8", "model.encoder_size=4",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "monitor.every_n_steps=1"]


def build(out: Path, *options: str) -> tuple[Path, Path]:
    """``python -m build``: the sdist, then the wheel built from it. Returns (sdist, wheel)."""
    result = subprocess.run([sys.executable, "-m", "build", *options, "--outdir", str(out),
                             str(ROOT)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    # --no-isolation: the environment's setuptools, so the suite needs no download to build
    return build(tmp_path_factory.mktemp("dist"), "--no-isolation")


def test_wheel_holds_every_module_config_and_data_file_the_licence_and_the_commands(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"rnnlab-{rnnlab.__version__}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    missing = [s for s in SOURCES if s not in names]
    assert not missing, f"not in the wheel (list their packages in pyproject.toml): {missing}"
    missing = [c for c in CONFIGS if f"rnnlab/conf/{c}" not in names]
    assert not missing, f"configs not in the wheel: {missing}"
    assert "rnnlab/tensorboard_plugin/static/index.js" in DATA
    missing = [d for d in DATA if d not in names]
    assert not missing, f"package data not in the wheel (pyproject's package-data): {missing}"
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["Version"] == rnnlab.__version__
    assert metadata["License-Expression"] == "MIT"
    assert re.search(r"^rnnlab = rnnlab\.cli:main$", entry_points, re.M)
    assert re.search(r"^\[tensorboard_plugins\]\ngradflow = "
                     r"rnnlab\.tensorboard_plugin:GradFlowLoader$", entry_points, re.M)
    stray = [n for n in names if n.endswith(".pyc") or not n.startswith(("rnnlab/", info))]
    assert not stray, f"the wheel holds files outside rnnlab/: {stray}"


def test_sdist_is_the_source_tree(dists):
    sdist, _ = dists
    top = f"rnnlab-{rnnlab.__version__}"
    with tarfile.open(sdist) as archive:
        names = {n.removeprefix(f"{top}/") for n in archive.getnames()}
    wanted = (["LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "MANIFEST.in"]
              + [f"src/{s}" for s in SOURCES] + [f"conf/{c}" for c in CONFIGS]
              + [p.relative_to(ROOT).as_posix() for d in ("tests", "scripts", "docs", "examples")
                 for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
              + [f"src/{d}" for d in DATA])
    missing = [w for w in wanted if w not in names]
    assert not missing, f"not in the sdist: {missing}"
    assert not [n for n in names if n.endswith(".pyc")]


def test_version_is_written_once_and_the_changelog_names_it():
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), "the version belongs in rnnlab"
    assert 'version = {attr = "rnnlab.__version__"}' in pyproject
    assert importlib.metadata.version("rnnlab") == rnnlab.__version__
    assert f"\n## {rnnlab.__version__}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_quickstart_is_two_commands_install_and_train_then_test():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    install, test = block.strip().splitlines()
    assert "pip install" in install and install.endswith("&& rnnlab train")
    assert test == "pytest"


# --------------------------------------------------------------- installed into a fresh venv

def files_of(package: Path) -> dict[str, bytes]:
    """Every file of an installed package but Python's bytecode cache, with its content."""
    return {p.relative_to(package).as_posix(): p.read_bytes() for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_built_wheel_in_a_fresh_venv_trains_reports_and_lists_from_another_directory(tmp_path):
    """About 5 min on a shared 2-core machine (305 s measured), 1.5 of them installing torch and
    the other dependencies from pip's cache; the venv (1.3 GB) is removed at the end."""
    sdist, wheel = build(tmp_path / "dist")  # as a release is built: in isolation
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
        bin_dir = venv / "bin"
        pip = subprocess.run([str(bin_dir / "pip"), "install", "-q", f"torch=={torch_version()}",
                              str(wheel)], capture_output=True, text=True, timeout=1800)
        assert pip.returncode == 0, pip.stderr[-3000:]
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "RNNLAB_CONFIG_PATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
        work = tmp_path / "work"  # outside the repository
        work.mkdir()

        def run(*command: str, **extra_env: str) -> subprocess.CompletedProcess:
            result = subprocess.run(list(command), cwd=work, env={**env, **extra_env},
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
            return result

        where = run("python", "-c", "import rnnlab; print(rnnlab.__file__)").stdout.strip()
        package = Path(where).parent
        assert package.is_relative_to(venv)
        installed = files_of(package)

        trained = run("rnnlab", "train", *TINY)
        (run_dir,) = (work / "outputs" / "adding" / "rnn").iterdir()
        assert (run_dir / "metrics.json").is_file() and (run_dir / "grad_flow").is_dir()
        assert trained.stdout.rstrip().endswith(f"rnnlab tensorboard {run_dir}")

        cell, target = write_readme_cell(work)
        user = run("rnnlab", "train", f"cell={cell}", *TINY, RNNLAB_CONFIG_PATH="my_conf")
        assert "is not used" not in user.stderr
        (user_run,) = (work / "outputs" / "adding" / cell).iterdir()
        assert (user_run / "metrics.json").is_file()
        assert f"_target_: {target}\n" in (user_run / ".hydra" / "config.yaml").read_text()

        run("rnnlab", "report", "outputs", "--out", "report")
        assert (work / "report" / "report.html").is_file()

        listing = run("rnnlab", "list", RNNLAB_CONFIG_PATH="my_conf").stdout
        for config in CONFIGS:
            group, _, name = config.removesuffix(".yaml").rpartition("/")
            if group:
                assert re.search(rf"^{re.escape(group)}\n(  .*\n)*  {name} ", listing, re.M), \
                    f"{config} is not listed"
        assert re.search(rf"^cell\n(  .*\n)*  {cell} .*\[.*my_conf\]$", listing, re.M)

        # TensorBoard in the venv finds the Gradient flow plugin and serves its packaged files.
        server = subprocess.Popen(["rnnlab", "tensorboard", "outputs", "--port", str(free_port())],
                                  cwd=work, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            url = re.search(r"(http://\S+/)", first_line(server))
            assert url, server.stderr.read() if server.poll() is not None else "no URL printed"

            def get(path: str) -> bytes:
                with urllib.request.urlopen(url[1] + path, timeout=60) as page:
                    return page.read()

            assert "gradflow" in json.loads(get("data/plugins_listing"))  # the entry point
            assert get("data/plugin/gradflow/static/index.js") == \
                (ROOT / "src/rnnlab/tensorboard_plugin/static/index.js").read_bytes()
        finally:
            server.terminate()
            server.wait(timeout=60)

        assert files_of(package) == installed, "a command wrote inside the installed package"

        # The sdist builds (in isolation) and installs over the wheel, and trains the same way.
        run("pip", "install", "-q", "--no-deps", "--force-reinstall", str(sdist))
        run("rnnlab", "train", *TINY)
        assert len(list((work / "outputs" / "adding" / "rnn").glob("*/metrics.json"))) == 2
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def torch_version() -> str:
    """The torch of this environment (its local build), so the fresh one installs the same."""
    return importlib.metadata.version("torch")


def write_readme_cell(directory: Path) -> tuple[str, str]:
    """The README's "Add your own cell" files, written into ``directory``. Returns the cell's
    option name and its YAML's ``_target_``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Add your own cell\n", 1)[1].split("\n## ", 1)[0]
    (cell, target) = ("", "")
    for path, text in re.findall(r"^`([\w./-]+)`:\n\n```(?:python|yaml)\n(.*?)^```", section,
                                 re.M | re.S):
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(text)
        if path.startswith("my_conf/cell/"):
            cell = Path(path).stem
            target = re.search(r"^_target_: (\S+)$", text, re.M)[1]
    assert cell and not (CONF / "cell" / f"{cell}.yaml").exists(), \
        f"the README's cell {cell!r} is missing or has the name of one of rnnlab's"
    return cell, target
