"""Training throughput of rnnlab against a raw PyTorch loop, measured in the same run.

For each cell × T (B = 64, H = 128, the adding task):

(a) ``raw``      a training loop as a researcher writes it: encoder → fused ``nn.RNN/GRU/LSTM``
                 (the ODE: a hand-written Euler loop) → decoder, Adam, no Lightning;
(b) ``off``      rnnlab (`rnnlab.train.train` on the real configs) with the monitor off;
(c) ``monitor``  rnnlab monitoring every ``every`` steps (the window holds exactly one
                 monitored step, so its cost is amortised as in a real run);
(d) ``probed``   one monitored (probed) forward+backward alone, against a plain unrolled
                 forward+backward of the same cell (the loop without probes).

``--ode`` measures the neural ODE's solver paths instead (`ODE_PATHS`): seconds per rnnlab
training step against manual Euler at the same T, and how time and peak memory grow with T.

``--user`` measures the callback on a user's own model instead: a LightningModule around a 2-layer
``nn.LSTM`` (H = 128, B = 64, T = 1000 by default, the adding task), trained with and without
`rnnlab.GradFlowCallback` monitoring every 50 steps (throughput, side by side), and one monitored
step (the unrolled, probed forward+backward) against one unmonitored (fused) step: time and peak
memory, each in a process of its own.

``--scans`` measures the scans of the LRU and minGRU against their own stepping loops
(`SCAN_PATHS`): one forward + backward of the cell alone, the paths alternating in one process
(so drifts in machine load hit them alike), and each path's peak memory in a process of its own.

``--jacobians`` times the transition Jacobians' norms (`gradflow.jacobians`) by the cell's own
J v and Jᵀ w against autograd's, beside a probed step of the same model and batch.

``--instruments`` times each part of the default monitor's work on one model and batch beside an
unmonitored training step (`instrument_costs`), and what each adds to a default period.

``--sweep`` measures a sweep's throughput instead: 20 short jobs (T = 50, 500 steps, seeds
0 … 19) under ``hydra/launcher=joblib``, one job at a time and two at a time, each sweep one
``rnnlab train -m`` process: its jobs per hour, their ratio, and per job the start-up (from the
job's first log line to its first training step), the training steps and the wind-down (to the
end of training's last hook) read from the jobs' own clocks (`JobClock`).

Each case runs in a fresh process, so its peak memory (max RSS, or CUDA max allocated) is its own.
``--paired`` also runs one raw step after each timed rnnlab step in that process (`StepTimer`)
and tables each mode's speed over the raw steps beside it, which a drift in machine speed moves
alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

B, H, ENCODER = 64, 128, 32
LR = 3e-3  # conf/model/default.yaml's: the same training dynamics, so the same subnormals
LONG_EVERY = 4  # beyond T = 1000: monitored every 4th step, the Jacobians every 8th (`plan`)
STEP_KINDS = ("unmonitored", "monitored", "after_monitored", "jacobian", "after_jacobian")
FUSED = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
RAW = (*FUSED, "node")  # the cells with a raw loop written by hand (`RawLoop`); the others are
# measured against their own unmonitored rnnlab run


class StepTimer(pl.Callback):
    """Times training steps ``warmup … warmup + steps − 1`` and writes steps/s to ``out``, with
    each timed step's milliseconds (``step_ms``: from the end of the step before, so the loop's
    work between steps is in it).

    ``paired``: after each timed step but the last, one step of the raw loop (`RawLoop`, the
    same cell and T, warmed up by as many steps before the window), timed apart and left out of
    rnnlab's time: the two alternate step by step in one process, so a drift in machine speed
    (tens of percent within a minute on a shared CPU) hits both alike; the raw loop's steps/s
    and its steps' milliseconds (``raw_step_ms``) go into ``out``. Its model is small and its
    graph freed before rnnlab's next step, but the process's peak memory is no longer rnnlab's
    alone. A cell without a hand-written raw loop is paired with its own rnnlab model trained
    by a bare PyTorch loop (`RawLoop.reference`), which its unmonitored and monitored runs are
    both measured against."""

    def __init__(self, out: str, warmup: int, steps: int, paired: dict | None = None):
        self.out, self.warmup, self.steps = Path(out), warmup, steps
        self.start = self.last = self.raw_s = 0.0
        self.paired = paired
        self.raw: RawLoop | None = None
        self.step_ms: list[float] = []
        self.raw_step_ms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.paired:
            self.raw = RawLoop(**self.paired, like=pl_module)
        for _ in range(self.warmup if self.raw else 0):
            self.raw.step()

    def begin(self, pl_module) -> None:
        sync(pl_module.device)
        self.start = self.last = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup == 0:
            self.begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # counts finished steps
        if step == self.warmup > 0:  # the window starts where the last warm-up step ended
            self.begin(pl_module)
        if not self.warmup < step <= self.warmup + self.steps:
            return
        sync(pl_module.device)
        now = time.perf_counter()
        self.step_ms.append(1000 * (now - self.last))
        if step == self.warmup + self.steps:
            timing = {"steps_per_s": self.steps / (now - self.start - self.raw_s),
                      "step_ms": self.step_ms}
            if self.raw:
                timing["raw_steps_per_s"] = len(self.raw_step_ms) / self.raw_s
                timing["raw_step_ms"] = self.raw_step_ms
            self.out.write_text(json.dumps(timing))
        elif self.raw:
            self.raw.step()
            sync(pl_module.device)
            self.last = time.perf_counter()
            self.raw_s += self.last - now
            self.raw_step_ms.append(1000 * (self.last - now))
        else:
            self.last = now


class JobClock(pl.Callback):
    """Writes the wall-clock times (time.time()) of a job's first training step, the end of its
    last and the end of the run (teardown) to ``out`` (``--sweep``)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.times: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.setdefault("first_step", time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times["last_step_end"] = time.time()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.out.write_text(json.dumps({**self.times, "teardown": time.time()}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adding_batches(T: int, device: str):
    from rnnlab.tasks import Adding
    from rnnlab.tasks.base import batch_generator

    task = Adding(seq_len=T, batch_size=B)
    index = 0
    while True:
        batch = task.generate(B, batch_generator(0, "train", index))
        index += 1
        yield batch["x"].to(device), batch["y"].to(device)


class RawNODE(nn.Module):
    """z ← z + g(cat(h_t, z))·δt, the Euler loop as written by hand, with rnnlab's g for the
    benchmark's node (``cell.width=H``, ``cell.depth=2``): Linear-tanh-Linear-tanh-Linear."""

    def __init__(self, input_size: int, hidden: int, width: int, dt: float):
        super().__init__()
        self.g = nn.Sequential(nn.Linear(input_size + hidden, width), nn.Tanh(),
                               nn.Linear(width, width), nn.Tanh(), nn.Linear(width, hidden))
        self.hidden, self.dt = hidden, dt

    def forward(self, u):
        z = u.new_zeros(u.shape[0], self.hidden)
        for u_t in u.unbind(1):
            z = z + self.g(torch.cat([u_t, z], -1)) * self.dt
        return None, z


class RawLoop:
    """The raw loop's model, optimizer and batches; `step` runs one training step. For a cell
    without a hand-written loop (not in `RAW`), the reference loop instead: rnnlab's model of
    the cell (``like``'s class and hyperparameters, its whole-sequence path where it has one)
    trained by the same bare loop."""

    def __init__(self, cell: str, T: int, device: str, like: nn.Module | None = None):
        with torch.random.fork_rng(devices=[]):  # a run it is paired with keeps its RNG stream
            torch.manual_seed(0)
            if cell in RAW:
                self.build(cell, T, device)
            else:
                self.reference(like, T, device)

    def reference(self, like: nn.Module | None, T: int, device: str) -> None:
        if like is None:
            raise ValueError("a cell without a raw loop is paired with its own model: pass like")
        self.model = model = type(like)(**like.hparams).to(device)
        self.loss = lambda x, y: model.loss_fn(model(x), y)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        self.data = adding_batches(T, device)

    def build(self, cell: str, T: int, device: str) -> None:
        self.encoder = nn.Linear(2, ENCODER)
        self.recurrent = (FUSED[cell](ENCODER, H, batch_first=True) if cell in FUSED
                          else RawNODE(ENCODER, H, width=H, dt=0.1))
        self.decoder = nn.Linear(H, 1)
        modules = nn.ModuleList([self.encoder, self.recurrent, self.decoder]).to(device)
        self.optimizer = torch.optim.Adam(modules.parameters(), lr=LR)
        self.data = adding_batches(T, device)
        self.loss = self.raw_loss

    def raw_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs, last = self.recurrent(self.encoder(x))
        z = outputs[:, -1] if outputs is not None else last
        return nn.functional.mse_loss(self.decoder(z).unsqueeze(1), y)

    def step(self) -> None:
        x, y = next(self.data)
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def run_raw(cell: str, T: int, warmup: int, steps: int, device: str) -> dict:
    loop = RawLoop(cell, T, device)
    step_ms = []  # every step's time, warm-up included
    for i in range(warmup + steps):
        sync(torch.device(device))
        begin = time.perf_counter()
        if i == warmup:
            start = begin
        loop.step()
        sync(torch.device(device))
        step_ms.append(round(1000 * (time.perf_counter() - begin)))
    return {"steps_per_s": steps / (time.perf_counter() - start), "step_ms": step_ms}


def subnormal_cost(T: int = 1000, steps: int = 20) -> None:
    """Print the ms per step of the raw tanh-RNN loop over its first ``steps`` steps, with
    subnormal floats kept and flushed to 0 (each in a fresh process)."""
    for flush in (False, True):
        case = {"cell": "rnn", "T": T, "mode": "raw", "warmup": 0, "steps": steps,
                "device": "cpu", "flush_denormal": flush}
        result = measure(case)
        label = "flushed to 0" if flush else "kept (PyTorch's default)"
        print(f"subnormals {label:<25} ms per step: {result.get('step_ms', result.get('error'))}")


def rnnlab_overrides(cell: str, T: int, device: str) -> list[str]:
    return [f"cell={cell}", "task=adding", f"task.seq_len={T}", f"task.batch_size={B}",
            f"cell.hidden_size={H}", *([f"cell.width={H}"] if cell == "node" else []),
            f"model.encoder_size={ENCODER}", f"model.optimizer.lr={LR}",
            "task.train_batches=1000000",
            "task.val_batches=1", "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "callbacks.model_checkpoint=null", "callbacks.progress_bar=null",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]


def run_rnnlab(cell: str, T: int, warmup: int, steps: int, device: str, every: int | None,
               extra: list[str] = (), paired: bool = False) -> dict:
    from rnnlab.config import compose_config
    from rnnlab.train import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        monitor = (["~monitor"] if every is None else [f"monitor.every_n_steps={every}"]) + [
            o for o in extra if every is not None or not o.startswith("monitor.")]
        cfg = compose_config(
            [*rnnlab_overrides(cell, T, device), *monitor,
             f"trainer.max_steps={warmup + steps}",
             "+callbacks.step_timer._target_=rnnlab.bench.StepTimer",
             f"+callbacks.step_timer.out={out}", f"+callbacks.step_timer.warmup={warmup}",
             f"+callbacks.step_timer.steps={steps}",
             *([f"+callbacks.step_timer.paired={{cell:{cell},T:{T},device:{device}}}"]
               if paired else [])],
            Path(tmp) / "run")
        metrics = train(cfg)
        cell = {k.removeprefix("cell/"): v for k, v in metrics.items() if k.startswith("cell/")}
        return {**json.loads(out.read_text()), **cell}  # the ODE's NFE per step among them


def run_probed(cell: str, T: int, repeats: int, device: str) -> dict:
    """Median time of a probed forward+backward over a plain unrolled one, same model and batch."""
    from rnnlab.config import compose_config
    from rnnlab.train import build, build_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(rnnlab_overrides(cell, T, device), Path(tmp) / "run")
        task = build(cfg.task)
        model = build_model(cfg, task).to(device)
    model.hparams.fast_path = False
    x, y = next(adding_batches(T, device))

    def once(probed: bool) -> float:
        sync(torch.device(device))
        start = time.perf_counter()
        probes = model.make_probes(B, T, model.probe_chunk()) if probed else None
        model.loss_fn(model(x, None, probes), y).backward()
        sync(torch.device(device))
        return time.perf_counter() - start

    once(True), once(False)  # warm up
    plain, probed = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        plain.append(once(False))
        probed.append(once(True))
    return {"plain_s": statistics.median(plain), "probed_s": statistics.median(probed)}


def instrument_case(cell: str, T: int, device: str):
    """The benchmark's model for ``cell`` at ``T`` (stepping, not its fused path) and one adding
    batch (x, y), for timing an instrument beside a probed step."""
    from rnnlab.config import compose_config
    from rnnlab.train import build, build_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(rnnlab_overrides(cell, T, device), Path(tmp) / "run")
        model = build_model(cfg, build(cfg.task)).to(device)
    model.hparams.fast_path = False
    x, y = next(adding_batches(T, device))
    return model, x, y


def timed(work, device: str) -> float:
    """Seconds of ``work()``, the device synchronised before and after."""
    sync(torch.device(device))
    start = time.perf_counter()
    work()
    sync(torch.device(device))
    return time.perf_counter() - start


def probed_step(model, x: torch.Tensor, y: torch.Tensor) -> None:
    """One probed forward + backward of ``model`` over the batch."""
    probes = model.make_probes(B, x.shape[1], model.probe_chunk())  # as the monitor's
    model.loss_fn(model(x, None, probes), y).backward()


def lyapunov_cost(cell: str, T: int, k: int, ons_every: int, repeats: int, device: str) -> None:
    """Print the median seconds of a probed step (forward + backward, B sequences) and of the
    Lyapunov spectrum of the same model and batch (k vectors of B // k sequences, the monitor's
    default), measured interleaved, and their ratio."""
    from rnnlab.lyapunov import lyapunov

    model, x, y = instrument_case(cell, T, device)

    def probed() -> None:
        probed_step(model, x, y)

    def spectrum() -> None:
        lyapunov(model, {"x": x, "y": y}, k, ons_every, sequences=max(1, B // k))

    timed(probed, device), timed(spectrum, device)  # warm up
    steps, spectra = [], []
    for _ in range(repeats):
        steps.append(timed(probed, device))
        spectra.append(timed(spectrum, device))
    step_s, spectrum_s = statistics.median(steps), statistics.median(spectra)
    print(f"Lyapunov spectrum, {cell}, k={k}, QR every {ons_every}, T={T}, H={H}, B={B} "
          f"({B // k} sequences), {device}, {torch.get_num_threads()} threads, median of "
          f"{repeats}: probed step {step_s:.3f} s, spectrum {spectrum_s:.3f} s, "
          f"ratio {spectrum_s / step_s:.2f}")


def jacobian_cost(cell: str, T: int, repeats: int, device: str) -> None:
    """Print the median seconds of a probed step and of the transition Jacobians' norms of the
    same model and batch (`gradflow.jacobians`, the monitor's default Lanczos steps), by the
    cell's own J v and Jᵀ w (`Cell.transition_jacobian`) and by autograd, interleaved, with the
    largest relative difference between the two."""
    import inspect

    import numpy as np

    from rnnlab import GradFlowCallback, gradflow

    iterations = inspect.signature(GradFlowCallback).parameters["jacobian_iterations"].default
    model, x, y = instrument_case(cell, T, device)
    own = model.cell.transition_jacobian
    paths = {"own": own, "autograd": None} if own is not None else {"autograd": None}
    norms = {}

    def jacobians(path: str) -> None:
        model.cell.transition_jacobian = paths[path]
        norms[path] = gradflow.jacobians(model, {"x": x, "y": y}, iterations).jacobian_norm

    seconds: dict[str, list[float]] = {"probed step": [], **{path: [] for path in paths}}
    for round_ in range(repeats + 1):  # the first warms up
        times = {"probed step": timed(lambda: probed_step(model, x, y), device),
                 **{path: timed(lambda path=path: jacobians(path), device) for path in paths}}
        for key, value in times.items():
            if round_:
                seconds[key].append(value)
    model.cell.transition_jacobian = own
    median = {key: statistics.median(value) for key, value in seconds.items()}
    parts = [f"{key} {value:.3f} s" for key, value in median.items()]
    if "own" in paths:
        difference = float(np.max(np.abs(norms["own"] / norms["autograd"] - 1)))
        parts.append(f"autograd/own {median['autograd'] / median['own']:.2f}, largest relative "
                     f"difference {difference:.1e}")
    print(f"Jacobian norms, {cell}, {iterations} Lanczos steps, T={T}, H={H}, B={B}, {device}, "
          f"{torch.get_num_threads()} threads, median of {repeats}: " + ", ".join(parts))


# bench --instruments: each part of the default monitor's work, timed alone on one model and
# batch beside an unmonitored training step, and what it adds to a default period
INSTRUMENT_PARTS = ("unmonitored step", "probed step", "probed step, contributions",
                    "contributions", "Jacobians", "Lyapunov")


def instrument_costs(cell: str, T: int, repeats: int, device: str) -> dict:
    """Median seconds of each of `INSTRUMENT_PARTS` for ``cell`` at ``T`` (B = 64, H = 128), in
    rounds that interleave them, on one model and batch: a training step's forward, backward and
    Adam step unmonitored (the path training takes: fused, chunked or stepping), the same probed
    as a monitored step is (the state probes, their norms), probed with the parameter probes,
    then, after that step's backward, the per-step contributions ‖dL/dW⁽ᵗ⁾‖
    (`ProbedPass.contributions`: the cell's streamed, recomputed a chunk at a time), the
    transition Jacobians' norms (`gradflow.jacobians`) and the Lyapunov spectrum, at the monitor's
    defaults.

    ``period``: what these add to the unmonitored steps of one period of the default monitor
    (`callbacks.INSTRUMENT_STEPS` steps, every 50th monitored, one of those with the Jacobians
    and the spectrum), as a fraction of their time, by part; ``predicted_over_off`` = 1 / (1 +
    their sum): the monitored run's speed over the unmonitored one's from these parts alone (the
    per-step hooks and the records' writes come on top; `plan`'s runs measure everything)."""
    import inspect

    from rnnlab import GradFlowCallback, gradflow
    from rnnlab.callbacks import INSTRUMENT_STEPS
    from rnnlab.config import compose_config
    from rnnlab.lyapunov import lyapunov
    from rnnlab.malloc import tune_malloc
    from rnnlab.probing import ProbeRequest
    from rnnlab.train import build, build_model

    tune_malloc()  # as training does (`malloc`'s default)
    defaults = inspect.signature(GradFlowCallback).parameters
    iterations = defaults["jacobian_iterations"].default
    k, ons_every = defaults["lyapunov_k"].default, defaults["lyapunov_ons_every"].default
    every = defaults["every_n_steps"].default
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(rnnlab_overrides(cell, T, device), Path(tmp) / "run")
        model = build_model(cfg, build(cfg.task)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = next(adding_batches(T, device))
    batch = {"x": x, "y": y}
    k = min(k, sum(s[0].numel() for s in model.cell.init_state(1)))
    passes: list = []

    def step(request: ProbeRequest | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if request is None:
            model.loss_fn(model(x), y).backward()
        else:
            with model.probing(request) as probed:
                model.loss_fn(model(x), y).backward()
            passes[:] = probed
            passes[0].profiles()
        optimizer.step()

    parts = {
        "unmonitored step": lambda: step(None),
        "probed step": lambda: step(ProbeRequest()),
        "probed step, contributions": lambda: step(ProbeRequest(contributions=True)),
        "contributions": lambda: passes[0].contributions(),  # of the step just before
        "Jacobians": lambda: gradflow.jacobians(model, batch, iterations),
        "Lyapunov": lambda: lyapunov(model, batch, k, ons_every, sequences=max(1, B // k)),
    }
    seconds: dict[str, list[float]] = {part: [] for part in parts}
    for round_ in range(repeats + 1):  # the first warms up
        for part, work in parts.items():
            elapsed = timed(work, device)
            if round_:
                seconds[part].append(elapsed)
    median = {part: statistics.median(times) for part, times in seconds.items()}
    return {"cell": cell, "T": T, "seconds": median,
            **period_shares(median, every, INSTRUMENT_STEPS)}


def period_shares(median: dict[str, float], every: int, period: int) -> dict:
    """`instrument_costs`' ``period`` and ``predicted_over_off`` from the parts' seconds: in
    ``period`` unmonitored steps' time, period // every monitored steps each add their probed
    step's extra time and the contributions, and one adds the Jacobians and the spectrum."""
    plain = median["unmonitored step"]
    monitored = period // every
    added = {"probed steps": monitored * (median["probed step, contributions"] - plain),
             "contributions": monitored * median["contributions"],
             "Jacobians": median["Jacobians"], "Lyapunov": median["Lyapunov"]}
    shares = {part: value / (period * plain) for part, value in added.items()}
    return {"period": shares, "predicted_over_off": 1 / (1 + sum(shares.values()))}


def instruments_table(rows: list[dict], title: str):
    """`instrument_costs` of each cell and T: milliseconds of each part, then the share of a
    default period each adds and the speed over unmonitored they predict."""
    from rich.table import Table

    table = Table(title=title)
    short = {"unmonitored step": "off step", "probed step": "probed",
             "probed step, contributions": "probed+contrib.", "contributions": "contrib.",
             "probed steps": "probed"}
    for column in ("cell", "T", *(f"{short.get(part, part)} ms" for part in INSTRUMENT_PARTS),
                   *(f"+{short.get(part, part)}" for part in rows[0]["period"]),
                   "predicted monitor/off"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["cell"], str(row["T"]),
                      *(f"{1000 * row['seconds'][part]:.1f}" for part in INSTRUMENT_PARTS),
                      *(f"{100 * share:.1f}%" for share in row["period"].values()),
                      f"{row['predicted_over_off']:.3f}")
    return table


class UserLSTM(pl.LightningModule):
    """A user's model as written without rnnlab: 2-layer nn.LSTM, linear read-out of the last
    output, MSE (the adding task), Adam."""

    def __init__(self, hidden: int = H, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1]).unsqueeze(1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


class AddingStream(torch.utils.data.IterableDataset):
    def __init__(self, T: int):
        self.T = T

    def __iter__(self):
        return adding_batches(self.T, "cpu")


def run_user(T: int, warmup: int, steps: int, device: str, every: int | None) -> dict:
    """Steps per second of `UserLSTM` in a Lightning Trainer, with the callback every ``every``
    steps (None: without it)."""
    import rnnlab

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        callbacks = [StepTimer(str(out), warmup, steps)]
        if every is not None:
            callbacks.append(rnnlab.GradFlowCallback(Path(tmp) / "grad_flow", every_n_steps=every))
        trainer = pl.Trainer(max_steps=warmup + steps, logger=False, callbacks=callbacks,
                             accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        data = torch.utils.data.DataLoader(AddingStream(T), batch_size=None)
        trainer.fit(UserLSTM(), data)
        return json.loads(out.read_text())


def run_user_step(T: int, repeats: int, device: str, probed: bool) -> dict:
    """Median seconds of one training step of `UserLSTM` (forward, backward, Adam), monitored
    (inside `rnnlab.watch`, the records read after backward) or not; the process's peak memory
    is this kind of step's alone."""
    import rnnlab

    torch.manual_seed(0)
    model = UserLSTM().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = next(adding_batches(T, device))
    watch = rnnlab.watch(model)

    def once() -> float:
        sync(torch.device(device))
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if probed:
            with watch:
                nn.functional.mse_loss(model(x), y).backward()
            watch.profiles()
        else:
            nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        sync(torch.device(device))
        return time.perf_counter() - start

    once()  # warm up
    return {"step_s": statistics.median(once() for _ in range(repeats))}


def run_case(case: dict) -> dict:
    torch.set_num_threads(case.get("threads") or torch.get_num_threads())
    flush = case.get("flush_denormal", False)
    torch.set_flush_denormal(flush)  # raw and probed; rnnlab's train sets it from its config
    device = case["device"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mode = case["mode"]
    if mode in ("scan_time", "scan_memory"):
        result = run_scans(case)
    elif mode == "raw":
        result = run_raw(case["cell"], case["T"], case["warmup"], case["steps"], device)
    elif mode == "probed":
        result = run_probed(case["cell"], case["T"], case["steps"], device)
    elif mode in ("user_off", "user_monitor"):
        result = run_user(case["T"], case["warmup"], case["steps"], device,
                          case["every"] if mode == "user_monitor" else None)
    elif mode in ("user_step", "user_step_monitored"):
        result = run_user_step(case["T"], case["steps"], device, mode == "user_step_monitored")
    else:
        every = case["every"] if mode in ("monitor", "every_step") else None
        result = run_rnnlab(case["cell"], case["T"], case["warmup"], case["steps"], device, every,
                            [*case.get("cell_overrides", []), *case.get("monitor_overrides", []),
                             f"flush_denormal={str(flush).lower()}"],
                            paired=case.get("paired", False))
        if "raw_steps_per_s" in result:  # per round: both from the same stretch of time
            result["over_raw"] = result["steps_per_s"] / result["raw_steps_per_s"]
        if "compose" in case:
            result |= compose_period(case, result)
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure(case: dict) -> dict:
    """Run one case in a fresh process; add its peak RSS (CPU) from the kernel's accounting."""
    process = subprocess.Popen([sys.executable, "-m", "rnnlab.bench", "--case", json.dumps(case)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:  # recorded; the other cases go on
        killed = process.returncode < 0 and -process.returncode == 9
        return {"error": ("killed (out of memory?)" if killed else
                          f"exit code {process.returncode}"), "stderr": stderr[-3000:],
                "peak_mb": usage.ru_maxrss / 1024}
    result = json.loads(stdout.strip().splitlines()[-1])
    result.setdefault("peak_mb", usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux
    return result


def combine_rounds(rounds: list[tuple[dict, dict]]) -> list[dict]:
    """One result per case from its rounds, given as (case with its ``round`` 0, 1, …, result
    with the case's fields and what it measured): the median of each of `MEASURED` over the
    rounds, the other fields from the first, ``rounds`` how many; a case that failed in any
    round is that round's failure."""
    groups: dict[str, list[dict]] = {}
    for case, result in rounds:
        key = json.dumps({k: v for k, v in case.items() if k != "round"}, sort_keys=True)
        groups.setdefault(key, []).append(result)
    combined = []
    for results in groups.values():
        failed = next((r for r in results if "error" in r), None)
        if failed is not None:
            combined.append(failed)
            continue
        merged = {k: v for k, v in results[0].items() if k != "round"}
        for key in MEASURED:
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            if values:
                merged[key] = statistics.median(values)
        combined.append({**merged, "rounds": len(results)})
    return combined


# The numbers a case measures (what `combine_rounds` takes the median of).
MEASURED = ("steps_per_s", "raw_steps_per_s", "over_raw", "plain_s", "probed_s", "peak_mb",
            "window_steps_per_s", "window_over_raw", "raw_step_ms_median",
            *(f"{kind}_step_ms" for kind in STEP_KINDS))


def plan(quick: bool, cells: list[str], lengths: list[int], paired: bool = False) -> list[dict]:
    """Each mode of each (cell, T) times the same window of training steps after a warm-up:
    at T ≤ 1000 one whole period of the default monitor (`callbacks.INSTRUMENT_STEPS`: ten
    monitored steps every 50, one of them with the Jacobians and the Lyapunov spectrum), so
    every instrument's cost is in it at its default frequency; beyond T = 1000 a window of each
    kind of step, the monitored rate composed from them for the same period (`compose_period`).
    ``every_step``: monitoring every step without the parameter contributions (the
    full-resolution heatmap's setting).
    ``paired``: rnnlab's modes alternate step by step with the raw loop (`StepTimer`)."""
    from rnnlab.callbacks import INSTRUMENT_STEPS

    cases = []
    for cell in cells:
        extra = [10_000] if cell in FUSED and not quick else []  # the fused three at 10,000 too
        for T in sorted(set(lengths) | set(extra)):
            long = T > 1000
            # Long T: a period of 500 steps would take an hour, so the window holds each kind of
            # step (`step_kind`: four unmonitored, one monitored, one with the Jacobians and the
            # spectrum, and the step after each of these two, which pays for what it left),
            # and the monitored run's rate is composed from them for the default period
            # (`compose_period`). Per-step parameter probes would need T × parameters (GiB); the
            # monitored step keeps every 100th state and recomputes the rest.
            every, jacobian_every = (LONG_EVERY, 2 * LONG_EVERY) if long else (50, None)
            warmup = 1 if long else 3
            steps = 2 * LONG_EVERY if long else INSTRUMENT_STEPS
            overrides = ["monitor.param_contributions=false", "model.checkpoint_steps=100",
                         f"monitor.jacobian_every_n_steps={jacobian_every}",
                         f"monitor.lyapunov_every_n_steps={jacobian_every}"] if long else []
            pair = {"paired": True} if paired else {}  # without a raw loop: `RawLoop.reference`
            for mode in ("raw", "off", "monitor") if cell in RAW else ("off", "monitor"):
                composed = ({"jacobian_every": jacobian_every,
                             "compose": {"every": 50, "period": INSTRUMENT_STEPS}}
                            if long and mode == "monitor" else {})
                cases.append({"cell": cell, "T": T, "mode": mode, "warmup": warmup,
                              "steps": steps, "every": every, "monitor_overrides": overrides,
                              **composed, **(pair if mode != "raw" else {})})
            if not long:
                cases.append({"cell": cell, "T": T, "mode": "every_step", "warmup": warmup,
                              "steps": steps, "every": 1,
                              "monitor_overrides": ["monitor.param_contributions=false"],
                              **pair})
            cases.append({"cell": cell, "T": T, "mode": "probed", "steps": 2 if long else 5})
    return cases


def step_kind(step: int, every: int, jacobian_every: int) -> str:
    """What training step ``step`` (0-based) is under a monitor every ``every`` steps with the
    Jacobians every ``jacobian_every``: one of `STEP_KINDS` (the step after a monitored step
    pays for what it left: freed memory handed back, a record written)."""
    if step % jacobian_every == 0:
        return "jacobian"
    if step % every == 0:
        return "monitored"
    if (step - 1) % jacobian_every == 0:
        return "after_jacobian"
    return "after_monitored" if (step - 1) % every == 0 else "unmonitored"


def compose_period(case: dict, result: dict) -> dict:
    """A monitored run's rate over the default monitor's period, from a window holding each kind
    of step (`plan` at long T, `step_kind`): ``compose`` = {every, period}: in ``period``
    steps, n = period/every monitored ones, one of them with the Jacobians and the spectrum,
    each followed by its after-step, the rest unmonitored. Each kind's median step time
    (``step_ms``, step ``warmup + i`` at i) over the median raw step beside them
    (``raw_step_ms``; unpaired: in milliseconds) is summed over the period. The window's own
    rates stay as ``window_*``."""
    every, jacobian_every = case["every"], case["jacobian_every"]
    kinds: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
    for step, ms in enumerate(result["step_ms"], start=case["warmup"]):
        kinds[step_kind(step, every, jacobian_every)].append(ms)
    missing = [kind for kind, times in kinds.items() if not times]
    if missing:
        raise ValueError(f"the window holds no {', no '.join(missing)} step to compose a period "
                         f"from (warmup {case['warmup']}, steps {case['steps']}, every {every}, "
                         f"jacobian_every {jacobian_every})")
    period = case["compose"]["period"]
    monitored = period // case["compose"]["every"]
    counts = {"unmonitored": period - 2 * monitored, "monitored": monitored - 1,
              "after_monitored": monitored - 1, "jacobian": 1, "after_jacobian": 1}
    medians = {kind: statistics.median(times) for kind, times in kinds.items()}
    total_ms = sum(counts[kind] * medians[kind] for kind in kinds)
    composed = {"window_steps_per_s": result["steps_per_s"],
                "steps_per_s": 1000 * period / total_ms,
                **{f"{kind}_step_ms": medians[kind] for kind in kinds}}
    if "raw_step_ms" in result:
        raw = statistics.median(result["raw_step_ms"])
        composed |= {"window_over_raw": result["over_raw"],
                     "over_raw": period * raw / total_ms, "raw_step_ms_median": raw}
    return composed


def memory_plan(cells: list[str], lengths: list[int]) -> list[dict]:
    """`--memory`: per cell and T, a short run unmonitored and one monitored every step with
    the default monitor (every instrument, the Jacobians and the spectrum on its first step):
    one warm-up step and two timed ones, each run in a fresh process for its peak memory.
    Beyond T = 1000 the long-sequence settings of `plan` (no per-step contributions, segments
    of 100 steps recomputed)."""
    long = ["monitor.param_contributions=false", "model.checkpoint_steps=100"]
    return [{"cell": cell, "T": T, "mode": mode, "warmup": 1, "steps": 2, "every": 1,
             "monitor_overrides": long if T > 1000 else []}
            for cell in cells for T in lengths for mode in ("off", "monitor")]


def memory_table(results: list[dict], title: str):
    """The table of `memory_plan`'s cases: each cell's peak memory unmonitored and monitored."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("cell", "T", "off MB", "monitor MB", "monitor MB/off", "off s/step",
                   "monitor s/step"):
        table.add_column(column, justify="right")
    summary = []
    for cell, T in dict.fromkeys((r["cell"], r["T"]) for r in results):
        by = {r["mode"]: r for r in results if r["cell"] == cell and r["T"] == T}
        failed = [m for m, r in by.items() if "error" in r]
        if failed:
            summary.append({"cell": cell, "T": T, "failed": failed})
            table.add_row(cell, str(T), "failed: " + ", ".join(failed), *[""] * 4)
            continue
        row = {"cell": cell, "T": T, "peak_mb": {m: by[m]["peak_mb"] for m in by},
               "s_per_step": {m: 1 / by[m]["steps_per_s"] for m in by}}
        row["monitor_memory_over_off"] = row["peak_mb"]["monitor"] / row["peak_mb"]["off"]
        summary.append(row)
        table.add_row(cell, str(T), f"{row['peak_mb']['off']:.0f}",
                      f"{row['peak_mb']['monitor']:.0f}", f"{row['monitor_memory_over_off']:.2f}",
                      f"{row['s_per_step']['off']:.3f}", f"{row['s_per_step']['monitor']:.3f}")
    return table, summary


# bench --ode: the neural ODE's solver paths, each as rnnlab trains it (monitor off; the fast
# path `cell.whole_sequence=auto` picks: one odeint for fixed-grid methods, odeint_adjoint over
# segments of `cell.adjoint_segment` intervals with the adjoint, interval by interval for dopri5),
# and dopri5 with `cell.whole_sequence=true` (the same paths, agreeing with stepping to the
# tolerance: its step size carries over from one interval to the next).
ODE_PATHS = {
    "manual Euler": ["cell.solver=manual_euler"],
    "euler": ["cell.solver=euler"],
    "rk4": ["cell.solver=rk4"],
    "dopri5": ["cell.solver=dopri5"],
    "euler adjoint": ["cell.solver=euler", "cell.adjoint=true"],
    "rk4 adjoint": ["cell.solver=rk4", "cell.adjoint=true"],
    "dopri5 adjoint": ["cell.solver=dopri5", "cell.adjoint=true"],
    "dopri5 whole sequence": ["cell.solver=dopri5", "cell.whole_sequence=true"],
    "dopri5 adjoint segments": ["cell.solver=dopri5", "cell.adjoint=true",
                                "cell.whole_sequence=true"],
}


def user_plan(T: int, every: int, repeats: int) -> list[dict]:
    """`--user`: the same Lightning model without and with the callback (the timed window of
    ``every`` steps holds one monitored step), alternated twice so drifts in machine load hit both;
    then single steps, unmonitored and monitored."""
    runs = [{"cell": "user lstm", "T": T, "mode": mode, "warmup": 3, "steps": every,
             "every": every} for _ in range(2) for mode in ("user_off", "user_monitor")]
    return runs + [{"cell": "user lstm", "T": T, "mode": mode, "steps": repeats}
                   for mode in ("user_step", "user_step_monitored")]


def user_table(results: list[dict], title: str):
    from rich.table import Table

    ok = [r for r in results if "error" not in r]
    mean = {mode: statistics.mean(r["steps_per_s"] for r in ok if r["mode"] == mode)
            for mode in ("user_off", "user_monitor")}
    step = {r["mode"]: r for r in ok if r["mode"].startswith("user_step")}
    summary = {"T": results[0]["T"], "every": results[0]["every"],
               "steps_per_s": mean, "monitored_over_off": mean["user_monitor"] / mean["user_off"],
               "step_s": {m: r["step_s"] for m, r in step.items()},
               "step_peak_mb": {m: r["peak_mb"] for m, r in step.items()}}
    table = Table(title=title)
    for column in ("", "steps/s (or s/step)", "ratio", "peak MB"):
        table.add_column(column, justify="right")
    table.add_row("without the callback", f"{mean['user_off']:.3f}", "1.00", "")
    table.add_row(f"callback every {summary['every']} steps", f"{mean['user_monitor']:.3f}",
                  f"{summary['monitored_over_off']:.3f}", "")
    plain, probed = step["user_step"], step["user_step_monitored"]
    table.add_row("one unmonitored step (fused)", f"{plain['step_s']:.3f} s", "1.00",
                  f"{plain['peak_mb']:.0f}")
    table.add_row("one monitored step (unrolled, probed)", f"{probed['step_s']:.3f} s",
                  f"{probed['step_s'] / plain['step_s']:.2f}",
                  f"{probed['peak_mb']:.0f} ({probed['peak_mb'] / plain['peak_mb']:.2f}×)")
    return table, summary


def ode_plan(paths: list[str], lengths: list[int], steps: int) -> list[dict]:
    return [{"cell": "node", "path": path, "T": T, "mode": "off", "warmup": 1, "steps": steps,
             "cell_overrides": ODE_PATHS[path]} for path in paths for T in lengths]


def cell_table(cells: list[str], results: list[dict], title: str):
    """The table of `plan`'s cases: each mode against raw PyTorch; and its summary rows."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("cell", "T", "raw steps/s", "off/raw", "monitor/raw", "monitor/off",
                   "every step/off", "probed/plain", "raw MB", "off MB", "monitor MB",
                   "monitor MB/off"):
        table.add_column(column, justify="right")
    summary = []
    for cell in cells:
        for T in sorted({r["T"] for r in results if r["cell"] == cell}):
            by = {r["mode"]: r for r in results if r["cell"] == cell and r["T"] == T}
            failed = [m for m, r in by.items() if "error" in r]
            if failed:
                summary.append({"cell": cell, "T": T, "failed": failed})
                table.add_row(cell, str(T), *(["failed: " + ", ".join(failed)] + [""] * 9))
                continue
            # Paired: each mode's speed over the raw loop it alternated with, and modes
            # compared through those ratios; else each over the raw case's speed.
            # A cell without a raw loop (`RAW`): its modes against its own unmonitored run
            # (paired: each over the reference loop it alternated with, `RawLoop.reference`).
            speed = {m: r.get("over_raw", r.get("steps_per_s")) for m, r in by.items()}
            raw = (None if "raw" not in by else
                   1.0 if "over_raw" in by["off"] else by["raw"]["steps_per_s"])
            row = {"cell": cell, "T": T,
                   "raw_steps_per_s": by["raw"]["steps_per_s"] if "raw" in by else None,
                   "paired": "over_raw" in by["off"],
                   "off_over_raw": speed["off"] / raw if raw else None,
                   "monitor_over_raw": speed["monitor"] / raw if raw else None,
                   "monitor_over_off": speed["monitor"] / speed["off"],
                   "every_step_over_off": (  # a time ratio: every step's time over off's
                       speed["off"] / speed["every_step"] if "every_step" in by else None),
                   "monitor_every": by["monitor"]["every"],
                   "steps_timed": by["monitor"].get("steps"),
                   # a long T's monitored rate: composed for the default period from its window
                   "composed": by["monitor"].get("compose"),
                   "probed_over_plain": by["probed"]["probed_s"] / by["probed"]["plain_s"],
                   "peak_mb": {m: by[m]["peak_mb"] for m in ("raw", "off", "monitor")
                               if m in by}}
            row["monitor_memory_over_off"] = row["peak_mb"]["monitor"] / row["peak_mb"]["off"]
            summary.append(row)
            every_step = row["every_step_over_off"]
            mark = "*" if row["composed"] else ""
            table.add_row(cell, str(T), *(f"{row[k]:.2f}" if row[k] is not None else "—"
                                          for k in ("raw_steps_per_s", "off_over_raw")),
                          *(f"{row[k]:.2f}{mark}" if row[k] is not None else "—"
                            for k in ("monitor_over_raw", "monitor_over_off")),
                          f"{every_step:.2f}" if every_step is not None else "",
                          f"{row['probed_over_plain']:.2f}",
                          *(f"{row['peak_mb'][m]:.0f}" if m in row["peak_mb"] else "—"
                            for m in ("raw", "off", "monitor")),
                          f"{row['monitor_memory_over_off']:.2f}")
    composed = [row["composed"] for row in summary if row.get("composed")]
    if composed:
        table.caption = (f"* composed for the default monitor's period of "
                         f"{composed[0]['period']} steps (every {composed[0]['every']}, one "
                         f"with the Jacobians and the spectrum) from a window of each kind of "
                         f"step: long T, where a whole period would take an hour")
    return table, summary


def ode_table(results: list[dict], title: str):
    """The table of `ode_plan`'s cases: seconds per training step against manual Euler at the
    same T, and time and peak memory against the same path at the shortest T."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("path", "T", "s/step", "× manual Euler", "time × shortest T", "peak MB",
                   "memory × shortest T", "NFE fwd", "NFE bwd"):
        table.add_column(column, justify="right")
    ok = {(r["path"], r["T"]): r for r in results if "error" not in r}
    summary = []
    for r in results:
        if "error" in r:
            summary.append({"path": r["path"], "T": r["T"], "failed": r["error"]})
            table.add_row(r["path"], str(r["T"]), f"failed: {r['error']}", *[""] * 6)
            continue
        shortest = ok.get((r["path"], min(x["T"] for x in results if x["path"] == r["path"])))
        manual = ok.get(("manual Euler", r["T"]))
        row = {"path": r["path"], "T": r["T"], "s_per_step": 1 / r["steps_per_s"],
               "over_manual_euler": manual and manual["steps_per_s"] / r["steps_per_s"],
               "time_over_shortest": shortest and shortest["steps_per_s"] / r["steps_per_s"],
               "peak_mb": r["peak_mb"],
               "memory_over_shortest": shortest and r["peak_mb"] / shortest["peak_mb"],
               "nfe_forward": r.get("nfe_forward"), "nfe_backward": r.get("nfe_backward")}
        summary.append(row)
        table.add_row(r["path"], str(r["T"]), f"{row['s_per_step']:.3f}",
                      *(f"{row[k]:.2f}" if row[k] else "" for k in
                        ("over_manual_euler", "time_over_shortest")),
                      f"{row['peak_mb']:.0f}",
                      f"{row['memory_over_shortest']:.2f}" if shortest else "",
                      *(f"{row[k]:.0f}" if row[k] is not None else "" for k in
                        ("nfe_forward", "nfe_backward")))
    return table, summary


# bench --scans: the cells' whole-sequence paths against their own `step` loop.
SCAN_PATHS = {"lru": ("loop", "scan"), "mingru": ("loop", "scan", "log_space")}
SCAN_TARGETS = {"lru": "rnnlab.cells.lru.LRU", "mingru": "rnnlab.cells.mingru.MinGRU"}


def scan_inputs(cell: str, T: int, device: str, batch: int, hidden: int):
    """The cell, encoder outputs u (batch, T, ENCODER) that require a gradient, and a fixed
    ∂L/∂z (batch, T, hidden) for every step's first state z_t."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    module = instantiate({"_target_": SCAN_TARGETS[cell], "hidden_size": hidden},
                         input_size=ENCODER).to(device)
    u = torch.randn(batch, T, ENCODER, device=device, requires_grad=True)
    grad = torch.randn(batch, T, hidden, device=device)
    return module, u, grad


def scan_pass(module, u, grad, path: str) -> float:
    """Seconds of one forward + backward of the cell alone over u on ``path``: the backward
    from ``grad`` = ∂L/∂z_t at every step, so that no loss's own cost is timed."""
    device = u.device
    sync(device)
    start = time.perf_counter()
    state = module.init_state(u.shape[0])
    if path == "loop":
        outputs = []
        for u_t in u.unbind(1):
            state = module.step(u_t, state, None)
            outputs.append(state[0])
        z = torch.stack(outputs, 1)
    elif path == "scan":
        z = module.sequence(u, state)[0]
    else:
        z = module.log_space_sequence(u, state)[0]
    z.backward(grad)
    sync(device)
    return time.perf_counter() - start


def run_scans(case: dict) -> dict:
    """``scan_time``: every path of the cell alternating, ``repeats`` rounds after a warm-up
    round: the median seconds of each. ``scan_memory``: one path once (``inputs only``: none),
    for the process's peak memory."""
    module, u, grad = scan_inputs(case["cell"], case["T"], case["device"], case["batch"],
                                  case["hidden"])
    if case["mode"] == "scan_memory":
        if case["path"] != "inputs only":
            scan_pass(module, u, grad, case["path"])
        return {}
    paths = SCAN_PATHS[case["cell"]]
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    for round_ in range(case["repeats"] + 1):
        for path in paths:
            elapsed = scan_pass(module, u, grad, path)
            if round_:  # the first round warms up
                seconds[path].append(elapsed)
    return {"seconds": {path: statistics.median(s) for path, s in seconds.items()},
            "all_seconds": seconds}


def scan_plan(lengths: list[int], threads: int, batch: int, hidden: int) -> list[dict]:
    cases = []
    for cell, paths in SCAN_PATHS.items():
        for T in lengths:
            size = {"cell": cell, "T": T, "threads": threads, "batch": batch, "hidden": hidden}
            cases.append({**size, "mode": "scan_time", "repeats": 5 if T <= 1000 else 2})
            cases += [{**size, "mode": "scan_memory", "path": path}
                      for path in ("inputs only", *paths)]
    return cases


def scan_table(results: list[dict], title: str):
    """Per cell and T: each path's seconds per forward + backward, the loop's time over it, its
    process's peak memory and that above a process holding only the cell and its inputs."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("cell", "T", "path", "ms fwd+bwd", "loop / path", "peak MB",
                   "MB above inputs"):
        table.add_column(column, justify="right")
    summary = []
    for cell, paths in SCAN_PATHS.items():
        for T in sorted({r["T"] for r in results if r["cell"] == cell}):
            timing = next((r for r in results if r["cell"] == cell and r["T"] == T
                           and r["mode"] == "scan_time"), {})
            memory = {r["path"]: r for r in results if r["cell"] == cell and r["T"] == T
                      and r["mode"] == "scan_memory"}
            base = memory.get("inputs only", {}).get("peak_mb")
            for path in paths:
                seconds = timing.get("seconds", {}).get(path)
                loop = timing.get("seconds", {}).get("loop")
                peak = memory.get(path, {}).get("peak_mb")
                failed = [r["error"] for r in (timing, memory.get(path, {})) if "error" in r]
                row = {"cell": cell, "T": T, "path": path, "seconds": seconds,
                       "loop_over_path": loop / seconds if seconds and loop else None,
                       "peak_mb": peak,
                       "mb_above_inputs": peak - base if peak and base else None,
                       "failed": failed}
                summary.append(row)
                table.add_row(cell, str(T), path,
                              f"{1000 * seconds:.0f}" if seconds else "failed",
                              f"{row['loop_over_path']:.2f}" if row["loop_over_path"] else "",
                              f"{peak:.0f}" if peak else "failed",
                              f"{row['mb_above_inputs']:.0f}" if row["mb_above_inputs"] else "")
    return table, summary


SWEEP_LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"  # Hydra's job log: [2026-12-05 23:46:54,157][…


def job_times(job_dir: Path) -> dict:
    """One job's start-up, training and wind-down seconds from its train.log's first line and
    its `JobClock` file."""
    from datetime import datetime

    first_line = (job_dir / "train.log").read_text().splitlines()[0]
    started = datetime.strptime(first_line[1:first_line.index("]")], SWEEP_LOG_TIME).timestamp()
    clock = json.loads((job_dir / "job_clock.json").read_text())
    return {"startup_s": clock["first_step"] - started,
            "train_s": clock["last_step_end"] - clock["first_step"],
            "winddown_s": clock["teardown"] - clock["last_step_end"]}


def run_sweep(n_jobs: int, jobs: int, T: int, steps: int, device: str) -> dict:
    """One sweep of ``jobs`` seeds under joblib with ``n_jobs`` at a time, in its own
    ``python -m rnnlab train -m`` process: wall seconds and the per-job times (`job_times`)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "rnnlab", "train", "-m", "hydra/launcher=joblib",
                   f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={tmp}/sweep",
                   f"seed={','.join(map(str, range(jobs)))}", f"task.seq_len={T}",
                   f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                   f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                   "+callbacks.job_clock._target_=rnnlab.bench.JobClock",
                   "+callbacks.job_clock.out=${paths.output_dir}/job_clock.json"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the sweep failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        clocks = sorted(Path(tmp, "sweep").glob("*/job_clock.json"))
        if len(clocks) != jobs:
            raise RuntimeError(f"{len(clocks)} of {jobs} jobs finished:\n{done.stderr[-3000:]}")
        times = [job_times(clock.parent) for clock in clocks]
    return {"n_jobs": n_jobs, "jobs": jobs, "wall_s": wall, "jobs_per_hour": 3600 * jobs / wall,
            **{key: statistics.median(t[key] for t in times) for key in times[0]}}


def sweep_table(results: list[dict], title: str):
    """Per number of parallel jobs: the sweep's wall time, jobs per hour and their ratio to one
    at a time, and the median job's start-up, training and wind-down seconds."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("jobs at once", "wall s", "jobs / hour", "vs 1 at a time",
                   "start-up s / job", "training s / job", "wind-down s / job"):
        table.add_column(column, justify="right")
    one = next(r["jobs_per_hour"] for r in results if r["n_jobs"] == 1)
    summary = []
    for r in results:
        row = {**r, "speedup": r["jobs_per_hour"] / one}
        summary.append(row)
        table.add_row(str(r["n_jobs"]), f"{r['wall_s']:.0f}", f"{r['jobs_per_hour']:.0f}",
                      f"{row['speedup']:.2f}", f"{r['startup_s']:.2f}", f"{r['train_s']:.2f}",
                      f"{r['winddown_s']:.2f}")
    return table, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="T = 100 only, for rnn, gru and lstm or the --cells given (minutes)")
    parser.add_argument("--cells", default="rnn,gru,lstm,node")
    parser.add_argument("--lengths", default="100,1000")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default="bench.json", help="where the JSON results go")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="every mode flushes subnormal floats to 0 (flush_denormal=true)")
    parser.add_argument("--subnormals", action="store_true",
                        help="only: ms per step of a raw tanh RNN (T=1000) over its first 20 "
                             "steps, subnormals kept and flushed")
    parser.add_argument("--ode", action="store_true",
                        help="only: the neural ODE's solver paths (cell=node, rnnlab training "
                             "with the monitor off) at --ode-lengths; about 45 minutes")
    parser.add_argument("--ode-paths", default=",".join(ODE_PATHS),
                        help="which of: " + ", ".join(ODE_PATHS) + " (comma-separated)")
    parser.add_argument("--ode-lengths", default="1000,10000")
    parser.add_argument("--ode-steps", type=int, default=2,
                        help="timed training steps per case, after one warm-up step")
    parser.add_argument("--user", action="store_true",
                        help="only: GradFlowCallback on a user's 2-layer nn.LSTM Lightning model "
                             "(H=128, B=64) at --user-length, with and without the callback")
    parser.add_argument("--user-length", type=int, default=1000)
    parser.add_argument("--scans", action="store_true",
                        help="only: the LRU's and minGRU's scans against their stepping loops "
                             "(the cell alone, forward + backward) at --scan-lengths")
    parser.add_argument("--scan-lengths", default="1000,10000")
    parser.add_argument("--scan-threads", type=int, default=1,
                        help="torch threads of each --scans case (1: steady on a shared CPU)")
    parser.add_argument("--scan-batch", type=int, default=B)
    parser.add_argument("--scan-hidden", type=int, default=H)
    parser.add_argument("--lyapunov", action="store_true",
                        help="only: the Lyapunov spectrum's cost (k=32) against a probed step, "
                             "for each of --cells at each of --lengths")
    parser.add_argument("--jacobians", action="store_true",
                        help="only: the transition Jacobians' cost, by the cell's own products "
                             "and by autograd, against a probed step, for each of --cells at "
                             "each of --lengths")
    parser.add_argument("--instruments", action="store_true",
                        help="only: each part of the default monitor's work (probed steps, "
                             "contributions, Jacobians, Lyapunov) timed beside an unmonitored "
                             "step, for each of --cells at each of --lengths, and the share of "
                             "a default period each adds")
    parser.add_argument("--memory", action="store_true",
                        help="only: each of --cells' peak memory at each of --lengths, "
                             "unmonitored and monitored every step (default monitor), two "
                             "steps after one, each in a fresh process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every case (interleaved, so drifts in machine load hit "
                             "every mode alike); the tables show each number's median")
    parser.add_argument("--sweep", action="store_true",
                        help="only: a joblib sweep's jobs per hour, 1 and 2 jobs at a time, and "
                             "each job's start-up time")
    parser.add_argument("--sweep-jobs", type=int, default=20)
    parser.add_argument("--sweep-length", type=int, default=50)
    parser.add_argument("--sweep-steps", type=int, default=500)
    parser.add_argument("--paired", action="store_true",
                        help="rnnlab's modes alternate step by step with the raw loop in one "
                             "process, and each is compared with the raw steps beside it: "
                             "ratios that drifts in machine speed do not move (peak memory "
                             "then includes the raw loop's)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.subnormals:
        subnormal_cost()
        return
    if args.lyapunov:
        for cell in (c for c in args.cells.split(",") if c):
            for T in (int(t) for t in args.lengths.split(",")):
                for ons_every in (1, 5):
                    lyapunov_cost(cell, T, 32, ons_every, repeats=3, device=args.device)
        return
    if args.jacobians:
        for cell in (c for c in args.cells.split(",") if c):
            for T in (int(t) for t in args.lengths.split(",")):
                jacobian_cost(cell, T, repeats=max(3, args.repeats), device=args.device)
        return

    from rich.console import Console
    from rich.progress import track

    if args.instruments:
        pairs = [(c, int(t)) for c in args.cells.split(",") if c for t in args.lengths.split(",")]
        rows = [instrument_costs(cell, T, repeats=max(3, args.repeats), device=args.device)
                for cell, T in track(pairs, description="instruments")]
        Console(width=200).print(instruments_table(
            rows, f"the default monitor's parts against an unmonitored step (B={B}, H={H}, "
                  f"adding, {args.device}, {torch.get_num_threads()} threads, medians of "
                  f"{max(3, args.repeats)} interleaved rounds)"))
        Path(args.out).write_text(json.dumps({"instruments": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

    if args.sweep:
        results = [run_sweep(n, args.sweep_jobs, args.sweep_length, args.sweep_steps,
                             args.device) for n in track((1, 2), description="sweeps")]
        table, summary = sweep_table(results, f"{args.sweep_jobs} jobs of T={args.sweep_length}, "
                                              f"{args.sweep_steps} steps (default model, "
                                              f"hydra/launcher=joblib, {os.cpu_count()} CPUs)")
        Console(width=150).print(table)
        Path(args.out).write_text(json.dumps({"summary": summary}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

    if args.user:
        cases = user_plan(args.user_length, every=50, repeats=5)
    elif args.scans:
        cases = scan_plan([int(t) for t in args.scan_lengths.split(",")], args.scan_threads,
                          args.scan_batch, args.scan_hidden)
    elif args.memory:
        cells = [c for c in args.cells.split(",") if c]
        cases = memory_plan(cells, [int(t) for t in args.lengths.split(",")])
    elif args.ode:
        paths = [p.strip() for p in args.ode_paths.split(",") if p.strip()]
        unknown = sorted(set(paths) - set(ODE_PATHS))
        if unknown:
            parser.error(f"--ode-paths: unknown {unknown}; choose from {list(ODE_PATHS)}")
        cases = ode_plan(paths, [int(t) for t in args.ode_lengths.split(",")], args.ode_steps)
    else:
        cells = [c for c in args.cells.split(",") if c]
        lengths = [int(t) for t in args.lengths.split(",")]
        if args.quick:  # rnn, gru and lstm at T = 100, or the cells named at T = 100
            default = args.cells == parser.get_default("cells")
            cells, lengths = [c for c in cells if c != "node" or not default], [100]
        cases = plan(args.quick, cells, lengths, args.paired)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for case in cases:
        case["device"] = args.device
        case["flush_denormal"] = args.flush_denormal
    rounds = [{**case, "round": r} for r in range(args.repeats) for case in cases]
    results = []
    for case in track(rounds, description="benchmarking"):
        results.append({**case, **measure(case)})
        if "error" in results[-1]:
            print(f"case {case} failed: {results[-1]['error']}\n{results[-1]['stderr'][-500:]}")
        Path(args.out).write_text(json.dumps({"cases": results}, indent=2) + "\n")  # so far
    every_round, results = results, combine_rounds(list(zip(rounds, results)))

    setting = (f"B={B}, H={H}, adding, lr {LR}, {args.device}, {torch.get_num_threads()} threads"
               + (", subnormals flushed" if args.flush_denormal else ""))
    if args.user:
        table, summary = user_table(results, f"GradFlowCallback on a user's 2-layer nn.LSTM "
                                             f"Lightning model ({setting}, T={args.user_length})")
    elif args.scans:
        table, summary = scan_table(results, f"LRU and minGRU: scan against stepping, the cell "
                                             f"alone (B={args.scan_batch}, "
                                             f"H={args.scan_hidden}, input {ENCODER}, "
                                             f"{args.device}, {args.scan_threads} thread(s))")
    elif args.memory:
        table, summary = memory_table(results, f"peak memory, monitored every step against "
                                               f"unmonitored ({setting})")
    elif args.ode:
        table, summary = ode_table(results, f"neural ODE solver paths, rnnlab training steps "
                                            f"({setting}, g 2×{H} tanh, δt 0.1)")
    else:
        pairing = (", paired step by step with the raw loop (a cell without one: with its own "
                   "model in a bare loop)" if args.paired else "")
        table, summary = cell_table(cells, results,
                                    f"rnnlab vs raw PyTorch ({setting}{pairing})")
    Console(width=150).print(table)
    Path(args.out).write_text(json.dumps({"summary": summary, "cases": every_round}, indent=2)
                              + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
