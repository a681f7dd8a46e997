"""With ``monitor.profile_dtype=float64`` a record holds numbers of two computations; each record
names which (``source_<field>``), and each number equals its named source's, computed here."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from rnnlab import gradflow
from rnnlab.records import record_of
from rnnlab.train import build, build_model

ADJOINT = ["cell=node", "cell.solver=dopri5", "cell.adjoint=true", "cell.whole_sequence=true",
           "cell.hidden_size=8", "cell.width=8", "task.seq_len=30", "task.batch_size=8",
           "trainer.max_steps=1", "+trainer.limit_val_batches=0",
           "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
           "monitor.jacobian_every_n_steps=0", "monitor.param_contributions=false"]


class CaptureFirstStep(pl.Callback):
    """The batch and the weights of training step 0, before the update."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batch = {k: v.clone() for k, v in batch.items()}
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def total_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()
         if p.grad is not None])))


def test_float64_profile_with_the_adjoint_names_each_numbers_source(make_cfg, tmp_path, caplog):
    cfg = make_cfg(*ADJOINT, "monitor.profile_dtype=float64",
                   f"monitor.dirpath={tmp_path / 'grad_flow'}")
    torch.manual_seed(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task)
    capture = CaptureFirstStep()
    trainer = build(cfg.trainer, callbacks=[capture, build(cfg.monitor)], logger=False)
    trainer.fit(model, datamodule=task)
    assert "each record names the sources" in caplog.text

    record = record_of(tmp_path / "grad_flow", 0)
    assert record.sources["profiles"] == record.sources["loss"] == "float64_copy"
    assert record.sources["grad_norms"] == "training_step"
    assert gradflow.load(tmp_path)["source_profiles"] == "float64_copy"  # loaded, not stacked

    def fresh(dtype: torch.dtype, fast_path: bool = True):
        copy = build_model(cfg, task).to(dtype)
        copy.hparams.fast_path = fast_path  # False: step by step, as the probed copy does
        copy.load_state_dict(capture.weights)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in capture.batch.items()}
        loss = copy.loss_fn(copy(batch["x"], batch.get("dt")), batch["y"])
        loss.backward()
        return copy, float(loss)

    # The training step: float32, the whole-sequence adjoint, as the model trains unmonitored.
    trained, _ = fresh(torch.float32)
    np.testing.assert_allclose(record.grad_norms["grad_norm_total"], total_norm(trained),
                               rtol=1e-6)
    # The float64 copy, stepping the adjoint interval by interval as its probed pass does: its
    # loss is the record's; its gradient, another computation than the recorded norm's, agrees
    # with the training step's to the solver's tolerance (what the warning says).
    copy, loss64 = fresh(torch.float64, fast_path=False)
    np.testing.assert_allclose(record.loss, loss64, rtol=1e-12)
    gap = abs(total_norm(copy) - total_norm(trained)) / total_norm(trained)
    assert gap < cfg.cell.rtol, gap


def test_float32_profile_comes_from_the_training_step_alone(make_cfg, tmp_path):
    cfg = make_cfg(*ADJOINT, f"monitor.dirpath={tmp_path / 'grad_flow'}")
    task = build(cfg.task)
    trainer = build(cfg.trainer, callbacks=[build(cfg.monitor)], logger=False)
    trainer.fit(build_model(cfg, task), datamodule=task)
    assert record_of(tmp_path / "grad_flow", 0).sources == {}
