"""Every state gets its own record key: the rule, the names refused before training, and the
profiles of the two-state cells (coRNN, LEM) measured apart, against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rnnlab import gradflow
from rnnlab.callbacks import custom_scalars_layout
from rnnlab.cells import Cell, state_keys
from rnnlab.config import ConfigError
from rnnlab.tasks import Adding
from rnnlab.train import train
from rnnlab.watching import find_targets

from .conftest import float64_model


@pytest.mark.parametrize(("names", "keys"), [
    (("h",), ("dL_dz",)),
    (("h", "c"), ("dL_dz", "dL_dc")),  # the LSTM's keys are unchanged
    (("y", "z"), ("dL_dz", "dL_dz_1")),  # coRNN, LEM: the second state z keeps its own key
    (("z",), ("dL_dz",)),
    (("a", "b", "z"), ("dL_dz", "dL_db", "dL_dz_2")),
])
def test_state_keys_first_is_dL_dz_later_are_named_and_a_later_z_is_numbered(names, keys):
    assert state_keys(names) == keys


def cell_with_states(names) -> type[Cell]:
    class Named(Cell):
        state_names = names

        def __init__(self, input_size: int = 2, hidden_size: int = 3):
            super().__init__(input_size, hidden_size)
            self.weight = nn.Parameter(torch.zeros(hidden_size))

    return Named


@pytest.mark.parametrize(("names", "why"), [
    (("y", "y"), "'y' names two states (#0 and #1)"),
    (("h", "c", "c"), "'c' names two states (#1 and #2)"),
    (("y", "z", "z_1"), "states 'z' (#1) and 'z_1' (#2) would both be recorded as dL_dz_1"),
    (("h", "W_cell"), "'W_cell' would be recorded as dL_dW_cell, a parameter contribution's key"),
    (("h", "c-1"), "'c-1' is not an identifier"),
    (("h", "for"), "'for' is not an identifier"),
    (("h", 3), "3 is not an identifier"),
    ((), "must be a non-empty tuple of names"),
    (["h"], "must be a non-empty tuple of names"),
])
def test_colliding_or_unusable_state_names_are_refused_when_the_cell_is_built(names, why):
    with pytest.raises(ConfigError) as error:
        cell_with_states(names)()
    message = str(error.value)
    assert message.startswith(f"Named.state_names = {names!r}: {why}; rename the state in "
                              "Named.state_names"), message


def test_a_colliding_user_cell_stops_the_run_before_training(make_cfg, tmp_path, monkeypatch):
    import rnnlab.cells.cornn as cornn

    monkeypatch.setattr(cornn.CoRNN, "state_names", ("y", "y"))
    with pytest.raises(ConfigError, match=r"CoRNN\.state_names = \('y', 'y'\)"):
        train(make_cfg("cell=cornn"))
    assert not (tmp_path / "run" / "grad_flow").exists()


def test_two_state_cell_gets_one_tensorboard_chart_per_state():
    model = float64_model({"_target_": "rnnlab.cells.cornn.CoRNN", "hidden_size": 3})
    layout = custom_scalars_layout(find_targets(model))["gradient flow"]
    charts = {title: tags for title, (_, tags) in layout.items() if title.startswith("||dL/dz")}
    assert charts == {"||dL/dz_t|| at the chosen t": [r"^dL_dz/t_\d+$"],
                      "||dL/dz_1_t|| at the chosen t": [r"^dL_dz_1/t_\d+$"]}


# --- the two profiles of coRNN and LEM ---------------------------------------------------------
def hand_loss(model, batch, t: int, state: int, shift: torch.Tensor) -> torch.Tensor:
    """The model's loss from a loop written here over ``cell.step``, with ``shift`` added to
    state ``state`` as carried from step t to step t+1 (the other state untouched)."""
    x, y = batch["x"], batch["y"]
    u = model.encoder(x)
    carried = model.cell.init_state(x.shape[0])
    for s in range(x.shape[1]):
        carried = model.cell.step(u[:, s], carried, None)
        if s == t:
            carried = tuple(c + shift if i == state else c for i, c in enumerate(carried))
    return model.loss_fn(model.decoder(carried[0]).unsqueeze(1), y)


@pytest.mark.parametrize("cell", ["cornn", "lem"])
def test_each_state_profile_is_its_own_directional_derivative(cell):
    """Along the measured gradient's unit direction, the finite difference of the hand-written
    loss is the recorded norm, for y (dL_dz) and for z (dL_dz_1) apart."""
    # large steps, so that both states move and matter within T = 9
    config = {"cornn": {"_target_": "rnnlab.cells.cornn.CoRNN", "dt": 0.5, "gamma": 1.0,
                        "epsilon": 0.5},
              "lem": {"_target_": "rnnlab.cells.lem.LEM", "dt": 1.0}}[cell]
    model = float64_model({**config, "hidden_size": 5}, encoder_size=3)
    T = 9
    batch = {k: v.double() for k, v in
             Adding(seq_len=T, batch_size=4).generate(4, torch.Generator().manual_seed(0)).items()}
    profiles = gradflow.grad_flow(model, batch).profiles
    assert set(profiles) == {"dL_dz", "dL_dz_1"}
    probes = model.make_probes(4, T)
    grads = torch.autograd.grad(model.loss_fn(model(batch["x"], None, probes), batch["y"]), probes)
    eps = 1e-6
    for state, key in enumerate(("dL_dz", "dL_dz_1")):
        for t in (0, 4, T - 2):
            direction = grads[state][t] / grads[state][t].norm()
            with torch.no_grad():
                slope = (hand_loss(model, batch, t, state, eps * direction)
                         - hand_loss(model, batch, t, state, -eps * direction)) / (2 * eps)
            assert slope.item() == pytest.approx(profiles[key][t], rel=1e-6), (key, t)
    # z as carried to a step that does not exist: the loss reads y_{T−1} only
    assert profiles["dL_dz_1"][-1] == 0.0 and profiles["dL_dz"][-1] > 0


def test_training_a_two_state_cell_records_both_profiles_and_finite_summaries(make_cfg, tmp_path):
    train(make_cfg("cell=cornn", "task.seq_len=12", "trainer.max_steps=2"))
    record = gradflow.load(tmp_path / "run")
    assert record["dL_dz"].shape == record["dL_dz_1"].shape == (2, 12)
    assert not np.allclose(record["dL_dz"], record["dL_dz_1"])
    assert (record["dL_dz_1"][:, -1] == 0).all() and (record["dL_dz"] > 0).all()
    assert np.isfinite(record["log10_first_last"]).all()  # of y's profile, never of z's zero
