"""The monitor's Lyapunov spectra of a user's torch.nn RNN, GRU and LSTM, per layer and direction,
against `module_lyapunov` called on the same weights and the module's input recomputed apart
from the trainer; and the mean over processes against one process holding every sequence."""

from __future__ import annotations

import copy
import csv
import threading

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rnnlab
from rnnlab import lyapunov
from rnnlab.records import record_of, summarize

T, FEATURES, B, STEPS = 40, 3, 6, 3


class GRUThenLSTM(pl.LightningModule):
    """x (B, T, features) → a GRU (batch_first) → tanh → a 2-layer LSTM (time first) → a class."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, 5, batch_first=True)
        self.lstm = nn.LSTM(5, 4, num_layers=2)
        self.head = nn.Linear(4, 2)

    def lstm_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gru(x)[0]).transpose(0, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.lstm(self.lstm_input(x))[0][-1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Snapshots(pl.Callback):
    """The weights and batch of each training step, after its backward pass: what the monitor
    measured on, before the optimizer changes the weights."""

    def __init__(self):
        self.taken, self.batches = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = [b.clone() for b in batch]

    def on_after_backward(self, trainer, pl_module):
        self.taken[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def fit(tmp_path, module: pl.LightningModule, data: TensorDataset, steps: int, **monitor):
    snapshots = Snapshots()
    callback = rnnlab.GradFlowCallback(tmp_path / "grad_flow", every_n_steps=1, **monitor)
    trainer = pl.Trainer(max_steps=steps, logger=CSVLogger(tmp_path, name="csv", version=""),
                         callbacks=[callback, snapshots], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=B))
    return snapshots


def logged(tmp_path) -> list[dict]:
    return list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))


def test_recorded_and_logged_spectra_of_a_gru_and_a_2_layer_lstm_equal_module_lyapunov(tmp_path):
    pl.seed_everything(0)
    model = GRUThenLSTM().double()
    x = torch.randn(B * STEPS, T, FEATURES, dtype=torch.float64)
    data = TensorDataset(x, (x[:, 0, 0] > 0).long())
    k, ons_every = 3, 2
    snapshots = fit(tmp_path, model, data, STEPS, lyapunov_every_n_steps=2, lyapunov_k=k,
                    lyapunov_ons_every=ons_every, figure_every_n_records=1)
    rows = logged(tmp_path)
    for step in (0, 2):  # the multiples of lyapunov_every_n_steps
        again = GRUThenLSTM().double()
        again.load_state_dict(snapshots.taken[step])
        batch_x = snapshots.batches[step][0]
        inputs = {"gru": batch_x, "lstm": again.lstm_input(batch_x).detach()}  # fused kernels
        for path, rows_expected in (("gru", ["l0"]), ("lstm", ["l0", "l1"])):
            record = record_of(tmp_path / "grad_flow" / path, step)
            module = getattr(again, path)
            S = B // k  # the monitor's default: batch_size // lyapunov_k sequences
            first = inputs[path][:S] if module.batch_first else inputs[path][:, :S]
            spectra = lyapunov.module_lyapunov(module, first, k, ons_every)
            assert list(spectra) == list(record.rows) == rows_expected
            section = record.lyapunov
            assert section.lyapunov.shape == (len(rows_expected), k)
            for i, (row, spectrum) in enumerate(spectra.items()):
                np.testing.assert_allclose(section.lyapunov_per_sequence[i], spectrum.exponents,
                                           rtol=1e-10, atol=1e-12, err_msg=f"{path} {row}")
                np.testing.assert_allclose(section.lyapunov[i], spectrum.exponents.mean(0),
                                           rtol=1e-10, atol=1e-12)
                expected = lyapunov.predicted_profile(spectrum.top_growth,
                                                      record.profiles["dL_dh"][i, -1])
                np.testing.assert_allclose(section.lyapunov_prediction[i], expected, rtol=1e-10)
                assert section.predicted_decay_rate[i] == pytest.approx(
                    summarize(expected)["decay_rate"], rel=1e-10)
                # what the logger got, row by row
                (row_logged,) = [r for r in rows if r.get(f"lyapunov/{path}/{row}/lambda_1")
                                 and int(r["step"]) == step]
                for j in range(k):
                    assert float(row_logged[f"lyapunov/{path}/{row}/lambda_{j + 1}"]) == \
                        pytest.approx(section.lyapunov[i, j], rel=1e-12)
                assert float(row_logged[f"grad_flow/{path}/{row}/predicted_decay_rate"]) == \
                    pytest.approx(section.predicted_decay_rate[i], rel=1e-12)
    # only the multiples of lyapunov_every_n_steps measure the spectrum
    assert record_of(tmp_path / "grad_flow" / "gru", 1).lyapunov is None
    figures = tmp_path / "grad_flow" / "figures"
    assert (figures / "grad_flow_lstm_lyapunov_0000002.png").is_file()
    assert not (figures / "grad_flow_lstm_lyapunov_0000001.png").exists()


def test_a_positive_relu_rnns_monitored_exponents_are_log10_of_its_eigenvalue_moduli(tmp_path):
    # As in test_lyapunov's module test: positive inputs and weights keep the ReLU RNN linear,
    # h_t = W_hh h_{t−1} + …, with W_hh = V diag(λ) Vᵀ on the Hadamard basis (positive entries).
    class ReLURNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(FEATURES, 4, nonlinearity="relu", batch_first=True)

        def training_step(self, batch, batch_idx):
            return self.rnn(batch[0])[0][:, -1].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    model = ReLURNN().double()
    V = torch.tensor([[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]],
                     dtype=torch.float64).T / 2
    eigenvalues = [0.9, 0.4, 0.2, 0.1]
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.05, 0.3)
        model.rnn.weight_hh_l0.copy_(V @ torch.diag(torch.tensor(eigenvalues,
                                                                 dtype=torch.float64)) @ V.T)
    x = torch.rand(B, 300, FEATURES, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(0))
    fit(tmp_path, model, TensorDataset(x), 1, lyapunov_k=4, lyapunov_ons_every=1,
        lyapunov_sequences=2)
    record = record_of(tmp_path / "grad_flow" / "rnn", 0)
    np.testing.assert_allclose(record.lyapunov.lyapunov_per_sequence[0],
                               np.tile(np.log10(eigenvalues), (2, 1)), atol=1e-10)


class FakeProcesses:
    """An all-reduce over ``n`` threads, one per simulated process: each passes its array and
    gets the elementwise sum or max of everyone's."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n)
        self.slots: list = [None] * n

    def reduce_of(self, rank: int):
        def reduce(values: np.ndarray, op: str) -> np.ndarray:
            self.slots[rank] = np.asarray(values)
            self.barrier.wait()
            result = (np.sum if op == "sum" else np.max)(np.stack(self.slots), 0)
            self.barrier.wait()
            return result
        return reduce


def test_mean_over_two_processes_is_the_section_of_both_processes_sequences_together():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(4, 60, 3, dtype=torch.float64)
    profile = np.abs(np.random.default_rng(0).normal(size=(2, 60))) + 0.1
    halves = [x[:2], x[2:]]  # process r holds sequences 2r, 2r + 1
    sections = [lyapunov.watched_lyapunov(lstm, half, None, profile, k=3) for half in halves]
    processes, results = FakeProcesses(2), [None, None]

    def run(rank: int) -> None:
        results[rank] = lyapunov.mean_over_processes(sections[rank], processes.reduce_of(rank), 2)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Expected: the four sequences' spectra pooled, straight from module_lyapunov.
    spectra = [lyapunov.module_lyapunov(lstm, half, 3) for half in halves]
    for i, (row, last) in enumerate((("l0", profile[0, -1]), ("l0_reverse", profile[1, 0]))):
        pooled = np.concatenate([s[row].exponents for s in spectra])  # (4, k)
        growth = np.concatenate([s[row].top_growth for s in spectra], axis=1)  # (T, 4)
        prediction = lyapunov.predicted_profile(growth, last)
        # A reverse direction's time runs backward: its prediction starts from ||dL/dh_0||.
        prediction = prediction[::-1] if row.endswith("_reverse") else prediction
        for result in results:
            np.testing.assert_allclose(result.lyapunov[i], pooled.mean(0), rtol=1e-12)
            np.testing.assert_allclose(result.lyapunov_prediction[i], prediction, rtol=1e-10)
            assert result.predicted_decay_rate[i] == pytest.approx(
                summarize(prediction)["decay_rate"], rel=1e-9)
    np.testing.assert_array_equal(results[1].lyapunov_per_sequence,
                                  sections[1].lyapunov_per_sequence)  # each process's own
