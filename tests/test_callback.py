"""GradFlowCallback on a user's own LightningModule, and through loggers other than TensorBoard."""

from __future__ import annotations

import csv
import logging
import sys
import weakref

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

import rnnlab
from rnnlab import gradflow
from rnnlab.records import record_of
from rnnlab.train import train

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import lstm_classifier  # noqa: E402
import plain_loop  # noqa: E402

T, STEPS = 9, 4


def fit(tmp_path, callback: bool, every_n_steps: int = 1, dtype=torch.float64, logger=False,
        **monitor):
    """The example's classifier, small, trained STEPS steps; returns (model, trainer).
    ``monitor``: the callback's other arguments (default: timestep 0 as scalars, figures every
    2nd record)."""
    monitor = {"timesteps": [0], "figure_every_n_records": 2, **monitor}
    pl.seed_everything(0)
    model = lstm_classifier.LSTMClassifier(features=3, hidden=5).to(dtype)
    data = lstm_classifier.first_sign_data(STEPS * 4, T, 3)
    data.tensors = (data.tensors[0].to(dtype), data.tensors[1])
    callbacks = [rnnlab.GradFlowCallback(tmp_path / "grad_flow", every_n_steps=every_n_steps,
                                         **monitor)] if callback else []
    trainer = pl.Trainer(max_steps=STEPS, logger=logger, callbacks=callbacks,
                         log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=4))
    return model, trainer


def test_monitoring_every_step_trains_the_same_parameters_as_no_monitoring(tmp_path):
    watched, _ = fit(tmp_path / "a", callback=True)
    plain, _ = fit(tmp_path / "b", callback=False)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(watched.state_dict()[name], value, rtol=1e-12, atol=1e-12,
                                   msg=name)
    records = gradflow.load(tmp_path / "a" / "grad_flow", module="lstm")
    assert records["step"].tolist() == list(range(STEPS))
    assert records["dL_dh"].shape == records["dL_dc"].shape == (STEPS, 2, T)
    assert list(records["rows"]) == ["l0", "l1"]


def test_the_first_record_is_the_profile_of_the_first_batch_on_the_initial_weights(tmp_path):
    fit(tmp_path, callback=True)
    record = record_of(tmp_path / "grad_flow" / "lstm", 0)
    pl.seed_everything(0)  # the same model and first batch, measured apart from the trainer
    model = lstm_classifier.LSTMClassifier(features=3, hidden=5).double()
    x, y = next(iter(DataLoader(lstm_classifier.first_sign_data(STEPS * 4, T, 3), batch_size=4)))
    kept = []
    h = c = torch.zeros(4, 5, dtype=torch.float64)
    layer_input = x.double()
    for layer in range(2):
        cell = torch.nn.LSTMCell(layer_input.shape[-1], 5).double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            delattr(cell, name)
            setattr(cell, name, getattr(model.lstm, f"{name}_l{layer}"))
        h = c = torch.zeros(4, 5, dtype=torch.float64)
        outputs = []
        for t in range(T):
            h, c = cell(layer_input[:, t], (h, c))
            h.retain_grad()
            kept.append((layer, h))
            outputs.append(h)
        layer_input = torch.stack(outputs, 1)
    loss = torch.nn.functional.cross_entropy(model.head(layer_input[:, -1]), y)
    loss.backward()
    expected = np.array([[float(h.grad.norm()) for layer, h in kept if layer == row]
                         for row in range(2)])
    np.testing.assert_allclose(record.profiles["dL_dh"], expected, rtol=1e-10)
    assert record.loss == pytest.approx(loss.item(), rel=1e-12)


def test_with_only_a_csv_logger_every_scalar_reaches_the_csv_and_the_log_says_where_figures_are(
        tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="csv", version="")
    with caplog.at_level(logging.INFO, logger="rnnlab.callbacks"):
        fit(tmp_path, callback=True, logger=logger)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    records = gradflow.load(tmp_path / "grad_flow", module="lstm")
    for i, row_name in enumerate(records["rows"]):
        for key in ("decay_rate", "log10_first_last", "horizon"):
            logged = {int(r["step"]): float(r[f"grad_flow/lstm/{row_name}/{key}"]) for r in rows
                      if r.get(f"grad_flow/lstm/{row_name}/{key}")}
            assert sorted(logged) == records["step"].tolist()
            np.testing.assert_allclose([logged[s] for s in sorted(logged)],
                                       records[key][:, i], rtol=1e-12, err_msg=key)
        for key in ("dL_dh", "dL_dc"):
            logged = [float(r[f"lstm/{key}/{row_name}/t_0000"]) for r in rows
                      if r.get(f"lstm/{key}/{row_name}/t_0000")]
            np.testing.assert_allclose(logged, records[key][:, i, 0], rtol=1e-12)
    for tag in ("grad_norm/lstm", "grad_norm/head", "grad_norm/total", "grad_norm/total_clipped"):
        assert len([r for r in rows if r.get(tag)]) == STEPS, tag
    figures = tmp_path / "grad_flow" / "figures"
    assert "CSVLogger takes no figures" in caplog.text and str(figures) in caplog.text
    assert sorted(p.name for p in figures.iterdir()) == [
        "grad_flow_lstm_heatmap_0000000.png", "grad_flow_lstm_heatmap_0000002.png",
        "grad_flow_lstm_heatmap_0000003.png",
        "grad_flow_lstm_lyapunov_0000000.png",  # step 0: a multiple of lyapunov_every_n_steps
        "grad_flow_lstm_profile_0000000.png", "grad_flow_lstm_profile_0000002.png",
        "grad_flow_lstm_profile_0000003.png"]


def test_with_only_a_csv_logger_and_no_figures_the_log_says_where_the_records_are(tmp_path,
                                                                                  caplog):
    logger = CSVLogger(tmp_path, name="csv", version="")
    with caplog.at_level(logging.INFO, logger="rnnlab.callbacks"):
        fit(tmp_path, callback=True, logger=logger, timesteps=None, figure_every_n_records=0)
    header = next(csv.reader(open(tmp_path / "csv" / "metrics.csv")))
    assert "grad_flow/lstm/l0/decay_rate" in header
    assert not [tag for tag in header if "/t_" in tag]
    assert "figures are off (monitor.figure_every_n_records=0)" in caplog.text
    assert f"every number is in the records under {tmp_path / 'grad_flow'}" in caplog.text
    assert not (tmp_path / "grad_flow" / "figures").exists()
    loaded = gradflow.load(tmp_path / "grad_flow", module="lstm")
    assert loaded["step"].tolist() == list(range(STEPS))


def test_rnnlab_run_with_tensorboard_and_csv_logs_the_records_scalars_to_both(make_cfg,
                                                                               tmp_path):
    train(make_cfg("logger=[tensorboard,csv]", "task.seq_len=6", "trainer.max_steps=2"))
    record = gradflow.load(tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    logged = [float(r["grad_flow/decay_rate"]) for r in rows if r.get("grad_flow/decay_rate")]
    np.testing.assert_allclose(logged, record["decay_rate"], rtol=1e-12)
    assert [r for r in rows if r.get("final/val_loss")]  # the final metrics too
    assert (tmp_path / "run" / "csv" / "hparams.yaml").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_examples_train_and_record_at_small_size(tmp_path):
    records = lstm_classifier.main(tmp_path / "lightning", seq_len=12, steps=4, hidden=6,
                                   batch_size=8, every_n_steps=2)
    flow = gradflow.load(records, module="lstm")
    assert flow["step"].tolist() == [0, 2] and flow["dL_dh"].shape == (2, 2, 12)
    assert np.isfinite(flow["dL_dh"]).all() and (flow["dL_dh"] > 0).all()
    profiles = plain_loop.main(tmp_path / "plain", seq_len=10, steps=3, hidden=6, batch_size=8,
                               every_n_steps=2)
    assert profiles["lstm"]["dL_dh"].shape == profiles["lstm"]["dL_dc"].shape == (2, 10)
    assert sorted(p.name for p in (tmp_path / "plain" / "grad_flow" / "lstm").iterdir()) == [
        "step_0000000.npz", "step_0000002.npz"]


def test_a_callback_naming_a_module_that_is_not_recurrent_fails_before_training(tmp_path):
    model = lstm_classifier.LSTMClassifier(features=3, hidden=5)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         callbacks=[rnnlab.GradFlowCallback(tmp_path, modules=["head"])])
    with pytest.raises(ValueError, match="'head' is a Linear, not a recurrent module"):
        trainer.fit(model, DataLoader(lstm_classifier.first_sign_data(4, T, 3), batch_size=4))
    assert not any(tmp_path.iterdir())


def test_wandb_takes_the_scalars_and_the_figures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp_path, project="rnnlab-test")
    logged = []  # what reached the logger (an offline run's file is W&B's own binary format)
    plain = logger.log_metrics
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step=None: (
        logged.append((step, dict(metrics))), plain(metrics, step))[1])
    fit(tmp_path, callback=True, logger=logger)
    wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    images = sorted(p.name.rsplit("_", 2)[0] for p in
                    (run / "files" / "media" / "images" / "grad_flow" / "lstm").iterdir())
    # records 0, 2 and the last, 3; the spectrum's on step 0 (lyapunov_every_n_steps = 50)
    assert images == ["heatmap"] * 3 + ["lyapunov"] + ["profile"] * 3
    records = gradflow.load(tmp_path / "grad_flow", module="lstm")
    decay = [(step, m["grad_flow/lstm/l1/decay_rate"]) for step, m in logged
             if "grad_flow/lstm/l1/decay_rate" in m]
    assert [step for step, _ in decay] == records["step"].tolist()
    np.testing.assert_allclose([v for _, v in decay], records["decay_rate"][:, 1], rtol=1e-12)


def test_mlflow_takes_the_scalars_and_the_figures_as_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="rnnlab-test", tracking_uri=uri,
                          artifact_location=str(tmp_path / "artifacts"))
    fit(tmp_path, callback=True, logger=logger)
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "grad_flow/lstm/l0/decay_rate")
    records = gradflow.load(tmp_path / "grad_flow", module="lstm")
    assert [m.step for m in history] == records["step"].tolist()
    np.testing.assert_allclose([m.value for m in history], records["decay_rate"][:, 0],
                               rtol=1e-12)
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "grad_flow/lstm/profile")}
    assert artifacts == {f"grad_flow/lstm/profile/step_{s:07d}.png" for s in (0, 2, 3)}


def test_the_callback_leaves_no_attribute_on_the_models_modules(tmp_path):
    pl.seed_everything(0)
    model = lstm_classifier.LSTMClassifier(features=3, hidden=5)
    before = {name: set(vars(m)) for name, m in model.named_modules() if name}
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[rnnlab.GradFlowCallback(tmp_path, every_n_steps=1)])
    trainer.fit(model, DataLoader(lstm_classifier.first_sign_data(8, T, 3), batch_size=4))
    assert {name: set(vars(m)) for name, m in model.named_modules() if name} == before


class LeafWatcher(rnnlab.GradFlowCallback):
    """Keeps weak references to each monitored step's probes, taken before they are measured."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.current is not None:
            self.leaves = [weakref.ref(leaf) for probed in self.watch.passes().values()
                           for leaf in probed.leaves()]
        super().on_after_backward(trainer, pl_module)


def test_a_monitored_steps_probes_are_freed_once_measured(tmp_path):
    """Nothing of a monitored step's probed pass (probes, their gradients, recorded calls) stays
    alive after the step, though the spectrum, measured after the records, reads the calls."""
    pl.seed_everything(0)
    model = lstm_classifier.LSTMClassifier(features=3, hidden=5)
    callback = LeafWatcher(tmp_path, every_n_steps=1, lyapunov_every_n_steps=1, lyapunov_k=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(model, DataLoader(lstm_classifier.first_sign_data(8, T, 3), batch_size=4))
    assert callback.leaves and all(ref() is None for ref in callback.leaves)
    assert callback.watch.passes() == {} and callback.watch.module_calls() == {}
    assert callback.last_records["lstm"].lyapunov is not None


class Failing(lstm_classifier.LSTMClassifier):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)  # the probed forward pass runs …
        raise RuntimeError("the user's step failed")  # … and then the step fails


def test_a_step_that_raises_leaves_the_module_on_its_fused_path(tmp_path):
    model = Failing(features=3, hidden=5)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[rnnlab.GradFlowCallback(tmp_path, every_n_steps=1)])
    with pytest.raises(RuntimeError, match="the user's step failed"):
        trainer.fit(model, DataLoader(lstm_classifier.first_sign_data(8, T, 3), batch_size=4))
    assert "forward" not in vars(model.lstm)
    assert model.lstm.forward.__func__ is torch.nn.LSTM.forward  # the fused kernel's


def test_the_tensorboard_logger_saves_at_most_every_save_every_s_and_always_at_the_end(
        tmp_path, monkeypatch):
    """Lightning calls `save` after every logged step; rnnlab's TensorBoard logger flushes the
    event file on the first call and then once `save_every_s` has passed, and `finalize` always
    saves: every scalar is in the event file and hparams.yaml is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rnnlab.loggers import TensorBoardLogger

    clock = [100.0]
    monkeypatch.setattr("rnnlab.loggers.time.monotonic", lambda: clock[0])
    logger = TensorBoardLogger(tmp_path, name="", version="", save_every_s=1.0)
    flushes = []
    writer = logger.experiment
    monkeypatch.setattr(writer, "flush", lambda: flushes.append(clock[0]))
    for step in range(5):
        logger.log_metrics({"train/loss": float(step)}, step)
        logger.save()
        clock[0] += 0.25  # calls at 100, 100.25, …, 101: saves at 100 and 101
    assert flushes == [100.0, 101.0]
    monkeypatch.undo()
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    assert (tmp_path / "hparams.yaml").is_file()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_the_tensorboard_logger_makes_the_events_of_its_scalars_at_its_saves(tmp_path,
                                                                             monkeypatch):
    """`log_metrics` holds a call's scalars; the save that flushes the event file (at most
    every save_every_s), every checkpoint (flushed) and `finalize`, also after a failure, write
    them, each at its step and the wall time of its call."""
    from rnnlab.loggers import TensorBoardLogger

    clock, wall = [100.0], [5000.0]
    monkeypatch.setattr("rnnlab.loggers.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("rnnlab.loggers.time.time", lambda: wall[0])
    written = []
    monkeypatch.setattr("rnnlab.loggers.summary.write",
                        lambda writer, step, summary, walltime=None: written.append(
                            (step, walltime, [(v.tag, v.simple_value) for v in summary.value])))
    logger = TensorBoardLogger(tmp_path, name="", version="", save_every_s=1.0)

    def event(step):
        return step, 5000.0 + step, [("train/loss", float(step)), ("epoch", 0.0)]

    for step in range(5):
        logger.log_metrics({"train/loss": float(step), "epoch": 0}, step)
        logger.save()  # saves at 100 and 101
        assert written == [event(s) for s in range(1 if step < 4 else 5)]
        clock[0] += 0.25
        wall[0] += 1
    logger.log_metrics({"train/loss": 5.0, "epoch": 0}, 5)
    assert len(written) == 5
    flushes = []
    monkeypatch.setattr(logger.experiment, "flush", lambda: flushes.append(len(written)))
    logger.after_save_checkpoint(None)  # a checkpoint: its steps' events flushed with it
    assert written == [event(s) for s in range(6)] and flushes == [6]
    wall[0] += 1
    logger.log_metrics({"train/loss": 6.0, "epoch": 0}, 6)
    logger.finalize("failed")  # what Lightning calls when training raises
    assert written == [event(s) for s in range(7)]


def test_the_tensorboard_logger_writes_a_calls_scalars_as_one_event(tmp_path):
    """Every scalar of a `log_metrics` call at its step and float32 value, as Lightning's
    add_scalar writes it, in one event; a 0-d tensor is read as its number, a dict goes through
    Lightning's add_scalars, and what is not a number is refused naming its tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto.event_pb2 import Event

    from rnnlab.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="", version="")
    metrics = {"grad_norm/cell": 0.1, "grad_norm/total": torch.tensor(2.5, dtype=torch.float64),
               "train/loss": 1 / 3}
    logger.log_metrics(metrics, 7)
    logger.log_metrics({"train/loss": 0.25, "pair": {"a": 1.0, "b": 2.0}}, 8)
    with pytest.raises(ValueError, match="grad_norm/bad: 'x' is not a number"):
        logger.log_metrics({"grad_norm/bad": "x"}, 9)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for tag, value in metrics.items():
        scalar = events.Scalars(tag)[0]
        assert scalar.step == 7 and scalar.value == float(np.float32(float(value)))
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (7, float(np.float32(1 / 3))), (8, 0.25)]
    with_values = []
    for path in tmp_path.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord: length (8), its crc (4), the event, its crc (4)
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.summary.value:
                with_values.append((event.step, len(event.summary.value)))
    assert with_values == [(7, 3), (8, 1)]
    assert (tmp_path / "pair_a").is_dir() and (tmp_path / "pair_b").is_dir()  # add_scalars'
