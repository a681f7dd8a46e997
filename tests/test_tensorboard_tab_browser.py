"""The Gradient flow tab in a real browser: headless Chromium opens TensorBoard on a two-run
logdir and the tab draws one profile per run, with T points, at the slider's step.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them) and selenium; skipped
without them.
"""

from __future__ import annotations

import math
import shutil

import pytest
from torch.utils.tensorboard import SummaryWriter

from rnnlab.tensorboard_plugin import summary

from .helpers.tensorboard_tab import get, has_records, sweep, synthetic_record, tensorboard

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    not (CHROMEDRIVER and CHROMIUM),
    reason="needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")

T = 24
STEPS = list(range(0, 60, 5))
GAINS = (0.9, 1.1)
WAIT_S = 120  # guards against a hang only: TensorBoard's page loads in seconds


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1700"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def drawn(driver) -> dict | None:
    """What the profile chart drew last: step, runs, T, the legend and the series' values."""
    return driver.execute_script("""
        const g = window.gradflow;
        if (!g || !g.drawn || !g.profile.plot) return null;
        const plot = g.profile.plot;
        return {...g.drawn, labels: plot.series.slice(1).map((s) => s.label),
                data: plot.data, errors: g.errors};""")


def runs_by_name(port: int) -> dict:
    return {r["run"]: r for r in get(port, "/data/plugin/gradflow/runs")["runs"]}


def expected_series(record: dict) -> list:
    """A log axis draws the positive values; 0 (underflow) and non-finite are gaps (null)."""
    return [v if math.isfinite(v) and v > 0 else None for v in record["dL_dz"].tolist()]


def test_the_tab_draws_every_run_and_the_slider_redraws_another_step(browser, tmp_path):
    runs = sweep(tmp_path / "logdir", list(GAINS), STEPS, T)
    with tensorboard(tmp_path / "logdir", "--load_fast=false",
                     ready=has_records(len(STEPS), len(GAINS))) as port:
        browser.get(f"http://127.0.0.1:{port}/#gradflow")
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
        frame = wait.until(lambda d: d.find_elements("css selector", "iframe"))[0]
        browser.switch_to.frame(frame)

        first = wait.until(lambda d: (s := drawn(d)) and s["step"] == STEPS[-1] and s)
        assert first["T"] == T
        assert first["labels"] == [f"cell.gain={g}" for g in GAINS]  # by what differs
        xs, *series = first["data"]
        assert xs == list(range(T))
        assert len(series) == len(runs)  # one series per run, T points each
        for values, records in zip(series, runs.values()):
            assert values == expected_series(records[STEPS[-1]])
            assert values[0] is None  # step 55 is odd: its 0 at t = 0 is a gap on the log axis

        slider = browser.find_element("id", "gf-step")
        slider.send_keys(Keys.ARROW_LEFT)  # as a user steps back one record
        moved = wait.until(lambda d: (s := drawn(d)) and s["step"] == STEPS[-2] and s)
        assert browser.find_element("id", "gf-step-label").text.startswith(f"step {STEPS[-2]}")
        xs, *series = moved["data"]
        assert len(series) == len(runs) and xs == list(range(T))
        for values, records in zip(series, runs.values()):
            assert values == expected_series(records[STEPS[-2]])
        assert moved["errors"] == []

        wait.until(lambda d: len(d.find_elements("css selector", ".gf-heat canvas")) == len(runs)
                   and d.find_elements("css selector", ".gf-summary"))
        browser.switch_to.default_content()
        screenshot = tmp_path / "gradient_flow_tab.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {screenshot}")
    severe = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "gradflow" in e["message"]]
    assert severe == []


def test_new_records_of_a_run_in_training_move_the_slider_to_them(browser, tmp_path):
    logdir = tmp_path / "logdir"
    runs = sweep(logdir, list(GAINS), STEPS, T)
    first_run, second_run = runs
    with tensorboard(logdir, "--load_fast=false",
                     ready=has_records(len(STEPS), len(GAINS))) as port:
        browser.get(f"http://127.0.0.1:{port}/#gradflow")
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
        browser.switch_to.frame(wait.until(lambda d: d.find_elements("css selector", "iframe"))[0])
        wait.until(lambda d: (s := drawn(d)) and s["step"] == STEPS[-1])

        later = {s: synthetic_record(s, T, GAINS[0]) for s in (60, 65)}  # the first run goes on
        writer = SummaryWriter(str(logdir / first_run), filename_suffix=".later")
        for step, record in later.items():
            summary.write_record(writer, step, record)
        writer.close()
        wait.until(lambda d: len(runs_by_name(port)[first_run]["tags"]["dL_dz"]["steps"]) == 14)
        browser.execute_script("window.gradflow.reload()")  # what the tab does every 30 s

        now = wait.until(lambda d: (s := drawn(d)) and s["step"] == 65 and s)
        assert now["labels"] == [f"cell.gain={GAINS[0]}", f"cell.gain={GAINS[1]} (step 55)"]
        _, latest, last_of_second = now["data"]
        assert latest == expected_series(later[65])
        assert last_of_second == expected_series(runs[second_run][55])  # its latest record
        assert browser.find_element("id", "gf-step-label").text.startswith("step 65  (record 14")
