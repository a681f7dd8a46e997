"""The real TensorBoard server, over a finished run, serves the tags the README promises."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from rnnlab import gradflow
from rnnlab.train import train

from .conftest import ROOT
from .helpers.tensorboard_tab import free_port, get


def readme_tags() -> dict[str, bool]:
    """Tags in the first column of the README's "TensorBoard tags" table → whether every run
    logs them (False where the "when" column says "only …")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## TensorBoard tags", 1)[1].split("\n## ", 1)[0]
    tags = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            columns = line.split("|")
            for tag in re.findall(r"`([^`]+)`", columns[1]):
                tags[tag] = "only" not in columns[2]
    return tags


def tag_pattern(tag: str) -> re.Pattern:
    """`dL_dz/t_<t>` → dL_dz/t_\\d+ ; `val/<metric>` → val/\\w+ ."""
    parts = re.split(r"<[^>]+>", tag)
    return re.compile(r"[\w.]+".join(re.escape(p) for p in parts) + "$")


@pytest.fixture
def served_run(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=10", "trainer.max_steps=4", "monitor.every_n_steps=2",
                   "monitor.timesteps=[0,-1]", "monitor.figure_every_n_records=1"))
    run = tmp_path / "run"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):  # up to ~60 s for the server to start and load the events
            try:
                if get(port, "/data/plugin/scalars/tags"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("tensorboard did not serve the run's scalars within 60 s")
        yield run, port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tensorboard_serves_the_readme_tags_with_the_recorded_values(served_run):
    run, port = served_run
    (run_name, scalar_tags), = get(port, "/data/plugin/scalars/tags").items()
    image_tags = set(get(port, "/data/plugin/images/tags").get(run_name, {}))
    served = set(scalar_tags) | image_tags
    promised = readme_tags()
    assert promised, "README has no TensorBoard tag table"
    for tag in [t for t, always in promised.items() if always]:
        assert any(tag_pattern(tag).match(s) for s in served), f"{tag} is not served"
    for tag in served:  # nothing logged that the README does not document
        assert any(tag_pattern(t).match(tag) for t in promised), f"{tag} is not in the README"

    record = gradflow.load(run)
    for tag in [t for t in scalar_tags if t.startswith("dL_dz/t_")]:
        t = int(tag.split("_")[-1])
        points = get(port, "/data/plugin/scalars/scalars", tag=tag, run=run_name)
        assert [p[1] for p in points] == record["step"].tolist()
        np.testing.assert_allclose([p[2] for p in points], record["dL_dz"][:, t], rtol=1e-6)
    decay = get(port, "/data/plugin/scalars/scalars", tag="grad_flow/decay_rate", run=run_name)
    np.testing.assert_allclose([p[2] for p in decay], record["decay_rate"], rtol=1e-6)

    images = get(port, "/data/plugin/images/images", tag="grad_flow/profile", run=run_name)
    assert [i["step"] for i in images] == record["step"].tolist()
    png = get(port, "/data/plugin/images/individualImage?" + images[-1]["query"])
    assert bytes(png[:8]) == b"\x89PNG\r\n\x1a\n"
