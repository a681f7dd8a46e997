"""How fast the Gradient flow tab serves and draws a sweep: each route's latency, and the time from
opening the page to the first chart drawn.

    python scripts/measure_tab.py                          # 24 runs x 40 records x T = 1000
    python scripts/measure_tab.py --runs 3 --records 100 --seq-len 10000 --step-through 30

Writes a synthetic sweep (one run per gain of a linear orthogonal RNN, ||dL/dz_t|| = gain^(T-1-t),
with the tags a run's monitor writes: 5 profiles and 9 summaries per record) into a temporary
logdir, serves it with `tensorboard` (the data server TensorBoard picks by default, and
--load_fast=false: the Python reader), then:

- routes: each route asked `--repeat` times per run as a browser asks (gzip accepted), median and
  worst latency in ms: /runs, /profile (every record of dL_dz, as JSON and as the float64 bytes
  the tab reads), /profile&step= (one record), /summaries;
- page (needs chromium and chromedriver): headless Chromium opens TensorBoard on the tab, a fresh
  browser each time; times from the top page's navigation start to the profile chart painted
  (every selected run drawn), to every heatmap and summary drawn, and, with --step-through N,
  the mean time to redraw the chart for the next of N training steps (the slider, from the
  whole profiles).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from rnnlab.tensorboard_plugin import summary

MODULES = ("encoder", "cell", "decoder")


def record(step: int, T: int, gain: float) -> dict:
    t = np.arange(T, dtype=np.float64)
    dL_dz = (1 + step / 1000) * gain ** (T - 1 - t)
    rate = float(np.log10(gain))
    return {"dL_dz": dL_dz, **{f"dL_dW_{m}": 0.1 * dL_dz for m in MODULES},
            "jacobian_norm": np.full(T, gain), "step": step, "T": T, "loss": 1 / (1 + step),
            "decay_rate": rate, "predicted_decay_rate": rate, "jacobian_rate": rate,
            "log10_first_last": (T - 1) * rate, "horizon": float(T),
            **{f"grad_norm_{m}": 1.0 for m in MODULES}}


def write_sweep(logdir: Path, runs: int, records: int, T: int, every: int = 100) -> None:
    for i in range(runs):
        gain = round(0.9 + 0.2 * i / max(1, runs - 1), 4)
        writer = SummaryWriter(str(logdir / f"{i}_cell.gain={gain}"))
        summary.write(writer, 0, summary.run_info_summary(["cell=rnn", f"cell.gain={gain}"]))
        for k in range(records):
            summary.write_record(writer, k * every, record(k * every, T, gain))
        writer.close()


def get(port: int, route: str, **query) -> bytes:
    url = f"http://127.0.0.1:{port}/data/plugin/gradflow/{route}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def get_json(port: int, route: str, **query):
    return json.loads(gzip.decompress(get(port, route, **query)))


def serve(logdir: Path, flags: list[str], runs: int, records: int):
    """A tensorboard process on a free port, once it has loaded every record."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            body = get_json(port, "runs")["runs"]
            if len(body) == runs and all(len(r["tags"]["dL_dz"]["steps"]) == records
                                         for r in body):
                return server, port, [r["run"] for r in body]
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("tensorboard did not load the sweep in 10 minutes")


def route_latencies(port: int, run_names: list[str], repeat: int) -> list[tuple[str, list]]:
    def timed(route, **query):
        start = time.perf_counter()
        get(port, route, **query)
        return 1000 * (time.perf_counter() - start)

    rows = [("/runs", [timed("runs") for _ in range(repeat)])]
    profile, binary, one, summaries = [], [], [], []
    for run in run_names:
        for _ in range(repeat):
            profile.append(timed("profile", run=run, tag="dL_dz"))
            binary.append(timed("profile", run=run, tag="dL_dz", format="float64"))
            summaries.append(timed("summaries", run=run))
        last = get_json(port, "profile", run=run, tag="dL_dz")["steps"][-1]
        one += [timed("profile", run=run, tag="dL_dz", step=last) for _ in range(repeat)]
    rows += [("/profile?run=&tag=dL_dz (every record, JSON)", profile),
             ("/profile?run=&tag=dL_dz&format=float64", binary),
             ("/profile?run=&tag=dL_dz&step= (one record)", one),
             ("/summaries?run=", summaries)]
    return rows


def page_timings(port: int, runs: int, step_through: int) -> dict:
    """One page load in a fresh headless Chromium: ms from navigation start."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/#gradflow")
        wait = WebDriverWait(driver, 300, poll_frequency=0.05)
        wait.until(lambda d: d.find_elements("css selector", "iframe"))
        driver.switch_to.frame(driver.find_element("css selector", "iframe"))
        # The frame's clock starts later than the page's: both as wall-clock epochs.
        wait.until(lambda d: d.execute_script(
            "const g = window.gradflow; return g && g.drawn && g.drawn.runs.length === "
            f"{runs};"))
        frame_origin, first = driver.execute_script(
            "return [performance.timeOrigin, window.gradflow.firstDrawMs]")
        wait.until(lambda d: d.execute_script(
            f"return document.querySelectorAll('.gf-heat canvas').length === {runs} && "
            "document.querySelectorAll('.gf-summary').length > 0"))
        everything = driver.execute_script("return performance.now()")
        result = {"frame_origin": frame_origin, "first_chart": first, "everything": everything}
        if step_through:
            times = []
            for _ in range(step_through):
                draws = driver.execute_script("return window.gradflow.draws")
                start = driver.execute_script(
                    "const s = document.getElementById('gf-step');"
                    "s.value = String(Math.max(0, Number(s.value) - 1));"
                    "const t = performance.now(); s.dispatchEvent(new Event('input')); return t")
                wait.until(lambda d, n=draws: d.execute_script(
                    f"return window.gradflow.draws > {n}"))
                times.append(driver.execute_script("return performance.now()") - start)
            result["step"] = times
        driver.switch_to.default_content()
        result["page_origin"] = driver.execute_script("return performance.timeOrigin")
        return result
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="requests per route and run")
    parser.add_argument("--pages", type=int, default=3, help="page loads per server")
    parser.add_argument("--step-through", type=int, default=0,
                        help="also time N slider steps (redraws from the whole profiles)")
    args = parser.parse_args()
    browser = shutil.which("chromedriver") and (shutil.which("chromium")
                                                or shutil.which("chromium-browser"))
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        start = time.perf_counter()
        write_sweep(logdir, args.runs, args.records, args.seq_len)
        print(f"sweep: {args.runs} runs x {args.records} records x T = {args.seq_len} written "
              f"in {time.perf_counter() - start:.1f} s")
        for reader, flags in (("data server (default)", []),
                              ("python reader (--load_fast=false)", ["--load_fast=false"])):
            server, port, run_names = serve(logdir, flags, args.runs, args.records)
            try:
                print(f"\n== {reader}")
                print(f"{'route':48s} {'median ms':>10s} {'worst ms':>10s} {'requests':>9s}")
                for route, times in route_latencies(port, run_names, args.repeat):
                    print(f"{route:48s} {statistics.median(times):10.1f} {max(times):10.1f} "
                          f"{len(times):9d}")
                if not browser:
                    print("page: skipped (no chromium and chromedriver)")
                    continue
                for i in range(args.pages):
                    t = page_timings(port, args.runs, args.step_through)
                    offset = t["frame_origin"] - t["page_origin"]
                    line = (f"page load {i + 1}: TensorBoard's page made the tab's frame at "
                            f"{offset:5.0f} ms; first chart drawn at "
                            f"{offset + t['first_chart']:5.0f} ms ({t['first_chart']:4.0f} ms "
                            f"after the frame); every heatmap and summary at "
                            f"{offset + t['everything']:5.0f} ms")
                    if "step" in t:
                        line += (f"; next step redrawn in {statistics.mean(t['step']):.0f} ms "
                                 f"(mean of {len(t['step'])}, worst {max(t['step']):.0f})")
                    print(line)
            finally:
                server.terminate()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
