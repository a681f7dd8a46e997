"""Training on the fast path is the same model: monitored every step or almost never, the same
parameters come out; the float64 profile is exact where float32 underflows; the compiled loop
matches the plain loop."""

from __future__ import annotations

import pytest
import torch

from rnnlab.train import build, build_model

from .conftest import CONF

CELLS = sorted(p.stem for p in (CONF / "cell").glob("*.yaml"))
# Cells whose unmonitored steps take another path than the probed loop: the fused kernels
# (rnn tanh, gru, lstm), the whole-sequence odeint, and the compiled loop.
FAST_VARIANTS = {
    **{cell: [f"cell={cell}"] for cell in CELLS},
    "node_whole_sequence": ["cell=node", "cell.solver=euler", "cell.whole_sequence=true"],
    "rnn_relu": ["cell=rnn", "cell.nonlinearity=relu"],
}
STEPS = 6


def train_parameters(make_cfg, overrides: list[str], every: int) -> dict[str, torch.Tensor]:
    """Train STEPS steps in float64 with the monitor every ``every`` steps; the final parameters."""
    cfg = make_cfg(*overrides, "+trainer.precision=64-true", f"trainer.max_steps={STEPS}",
                   f"monitor.every_n_steps={every}", "monitor.jacobian_every_n_steps=0",
                   "task.seq_len=12", "task.train_batches=8", "+trainer.limit_val_batches=0",
                   "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
                   "cell.hidden_size=6", "model.encoder_size=4")
    torch.manual_seed(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task)
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    trainer = build(cfg.trainer, callbacks=[build(cfg.monitor)], logger=False)
    trainer.fit(model, datamodule=task)
    assert trainer.global_step == STEPS
    assert any(not torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", sorted(FAST_VARIANTS))
def test_monitoring_every_step_trains_the_same_parameters_as_monitoring_rarely(make_cfg, variant):
    overrides = FAST_VARIANTS[variant]
    probed = train_parameters(make_cfg, overrides, every=1)
    fast = train_parameters(make_cfg, overrides, every=1000)
    assert probed.keys() == fast.keys()
    for name in probed:
        assert probed[name].dtype == torch.float64
        torch.testing.assert_close(fast[name], probed[name], rtol=1e-10, atol=1e-12, msg=name)
