"""The training optimizer: the fused kernel where torch has one, and the same updates as the
per-tensor loop."""

from __future__ import annotations

import pytest
import torch

from rnnlab.model import RecurrentModel
from rnnlab.tasks import Adding

from .conftest import default_dtype

CELL = {"_target_": "rnnlab.cells.gated.GRU", "hidden_size": 6}


def model_with(optimizer: dict, seed: int = 0) -> RecurrentModel:
    torch.manual_seed(seed)
    with default_dtype(torch.float64):
        return RecurrentModel(cell=CELL, input_size=2, output_size=1, encoder_size=4,
                              optimizer=optimizer)


@pytest.mark.parametrize(("optimizer", "fused"), [
    ({"name": "adam", "lr": 1e-2}, True),
    ({"name": "adamw", "lr": 1e-2}, True),
    ({"name": "sgd", "lr": 1e-2}, True),
    ({"name": "rmsprop", "lr": 1e-2}, None),                  # torch has no fused RMSprop
    ({"name": "adam", "lr": 1e-2, "foreach": True}, None),    # the configuration's choice
    ({"name": "adam", "lr": 1e-2, "fused": False}, False),
])
def test_the_fused_kernel_is_chosen_unless_configured_otherwise(optimizer, fused):
    built = model_with(optimizer).configure_optimizers()
    assert built.defaults.get("fused") is fused


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_updates_equal_the_per_tensor_loop(name):
    config = {"name": name, "lr": 1e-2, **({"momentum": 0.9} if name == "sgd" else {})}
    model, reference = model_with(config), model_with(config)
    fused = model.configure_optimizers()
    kwargs = {k: v for k, v in config.items() if k != "name"}
    loop = type(fused)(reference.parameters(), foreach=False, **kwargs)
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    task = Adding(seq_len=12, batch_size=8)
    for step in range(5):
        batch = {k: v.double() for k, v in
                 task.generate(8, torch.Generator().manual_seed(step)).items()}
        for m, opt in ((model, fused), (reference, loop)):
            opt.zero_grad()
            m.loss_fn(m(batch["x"]), batch["y"]).backward()
            opt.step()
    moved = 0.0
    for (key, p), q, p0 in zip(model.named_parameters(), reference.parameters(),
                               model_with(config).parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=key)
        moved = max(moved, float((p - p0).detach().abs().max()))
    assert moved > 1e-3  # five steps moved the parameters
