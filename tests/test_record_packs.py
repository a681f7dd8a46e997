"""Records of several monitored steps in one file (``steps_<first>-<last>.npz``): read as the
records of one step a file are, written by the monitor as ``monitor.records_per_file`` says, held
until a pack is full, a checkpoint, the end of training or an exception, and split by a resume
from a checkpoint inside a pack."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from rnnlab import records
from rnnlab.callbacks import MODEL, RECORD_FILE_STEPS, GradFlowCallback
from rnnlab.config import ConfigError, compose_config
from rnnlab.records import (
    Jacobians,
    Record,
    load_records,
    pack_path,
    read_records,
    record_files,
    save_records,
)
from rnnlab.resume import Checkpoint, carry_history
from rnnlab.rundir import RunFileError

T = 6


def some_records(steps=(0, 1, 2, 3)) -> list[Record]:
    """Records that differ in what they hold: a loss on some, the Jacobians on one."""
    rng = np.random.default_rng(0)
    made = []
    for step in steps:
        record = Record(step, {"dL_dz": rng.random(T) + 0.1},
                        loss=float(rng.random()) if step % 2 else None,
                        grad_norms={"grad_norm_total": float(rng.random())})
        if step == steps[1]:
            norms = rng.random(T)
            record.jacobians = Jacobians(jacobian_norm=norms, jacobian_rate=float(norms.mean()))
        made.append(record)
    return made


def assert_same_stack(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_pack_loads_as_the_same_records_one_file_each(tmp_path):
    made = some_records()
    for record in made:
        record.save(tmp_path / "single")
    path = save_records(made, tmp_path / "packed")
    assert path == pack_path(tmp_path / "packed", 0, 3) and path.name == "steps_0000000-0000003.npz"
    assert record_files(tmp_path / "packed") == [path]
    single, packed = records.load(tmp_path / "single"), records.load(tmp_path / "packed")
    assert_same_stack(single, packed)
    assert packed["step"].tolist() == [0, 1, 2, 3]
    assert math.isnan(packed["loss"][0]) and np.isnan(packed["jacobian_norm"][2]).all()
    for record, loaded in zip(made, load_records(path)):
        assert_same_stack(record.arrays(), loaded.arrays())  # keys a record lacks stay absent
    assert [r.step for r in load_records(tmp_path / "single" / "step_0000002.npz")] == [2]


def test_a_pack_holds_a_row_per_record_of_the_keys_all_hold_and_the_rest_by_step(tmp_path):
    """`pack_arrays`: ``step``, the profile, the gradient norm and ``T`` (in every record, one
    shape) as rows; the loss (odd steps only) and the Jacobians (one step) under their steps."""
    made = some_records()
    with np.load(save_records(made, tmp_path)) as data:
        keys = set(data)
        np.testing.assert_array_equal(data["step"], [0, 1, 2, 3])
        np.testing.assert_array_equal(data["dL_dz"], [r.main_profile for r in made])
        np.testing.assert_array_equal(data["grad_norm_total"],
                                      [r.grad_norms["grad_norm_total"] for r in made])
    assert {"T", "decay_rate", "0000001/loss", "0000003/loss", "0000001/jacobian_norm"} <= keys
    assert not {"loss", "jacobian_norm", "0000000/loss", "0000002/dL_dz"} & keys


def test_a_pack_of_every_key_by_step_reads_as_the_same_records(tmp_path):
    """Packs written with every key as ``<step:07d>/<key>`` (rnnlab's first pack layout)."""
    made = some_records()
    path = pack_path(tmp_path, 0, 3)
    np.savez(path, **{f"{r.step:07d}/{k}": v for r in made for k, v in r.arrays().items()})
    for record, loaded in zip(made, load_records(path), strict=True):
        assert_same_stack(record.arrays(), loaded.arrays())


def test_packs_and_single_records_of_one_run_load_together_in_step_order(tmp_path):
    made = some_records(range(7))
    save_records(made[4:6], tmp_path)
    save_records(made[:3], tmp_path)
    made[3].save(tmp_path)
    save_records(made[6:], tmp_path)  # one record: its own file
    assert [p.name for p in record_files(tmp_path)] == [
        "step_0000003.npz", "step_0000006.npz", "steps_0000000-0000002.npz",
        "steps_0000004-0000005.npz"]
    stacked = records.load(tmp_path)
    assert stacked["step"].tolist() == list(range(7))
    np.testing.assert_array_equal(stacked["dL_dz"], [r.main_profile for r in made])


def test_a_step_in_a_pack_and_in_a_file_is_two_runs_named(tmp_path):
    made = some_records()
    save_records(made, tmp_path)
    made[2].save(tmp_path)
    with pytest.raises(RunFileError, match=r"step_0000002\.npz.*both hold step 2|"
                                           r"steps_0000000-0000003\.npz.*both hold step 2"):
        records.load(tmp_path)


def test_a_damaged_pack_is_named_with_what_to_do(tmp_path):
    path = save_records(some_records(), tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RunFileError, match=rf"^{path} cannot be read .*cut short.*delete it"):
        records.load(tmp_path)
    np.savez(path, dL_dz=np.ones(T), step=np.asarray(0))  # one record's keys, not rows
    with pytest.raises(RunFileError, match=rf"^{path} holds dL_dz \(6,\), step \(\), not a row"):
        read_records(path)
    np.savez(path, dL_dz=np.ones((3, T)), step=np.arange(2))  # rows of 3 steps, 2 listed
    with pytest.raises(RunFileError, match=rf"^{path} holds dL_dz \(3, 6\), step \(2,\), not a"):
        read_records(path)
    np.savez(path, dL_dz=np.ones((2, T)), step=np.arange(2), **{"0000005/loss": np.asarray(1.0)})
    with pytest.raises(RunFileError, match=rf"^{path} holds '0000005/loss', of a step its 'step' "
                                           "does not list"):
        read_records(path)
    np.savez(path, **{"0000001/dL_dz": np.ones(T), "0000001/step": np.asarray(1), "x/y/z": 0})
    with pytest.raises(RunFileError, match=rf"^{path} holds 'x/y/z', not <step>/<key>"):
        read_records(path)
    np.savez(path, **{"0000001/dL_dz": np.ones(T)})  # a step's keys without its step
    with pytest.raises(RunFileError, match=rf"^{path} holds no 'step'"):
        records.load(tmp_path)
    arrays = {f"0000007/{k}": v for k, v in some_records()[0].arrays().items()}
    np.savez(path, **arrays)  # step 0's record under step 7
    with pytest.raises(RunFileError, match=rf"^{path} holds step 0 under 0000007/"):
        records.load(tmp_path)
    np.savez(path)  # a zip of nothing
    with pytest.raises(RunFileError, match=rf"^{path} holds no records: .*delete it"):
        records.load(tmp_path)


@pytest.mark.parametrize("every, expected", [(1, 50), (2, 25), (10, 5), (30, 1), (50, 1),
                                             (200, 1)])
def test_auto_packs_records_of_at_least_fifty_steps_a_file(tmp_path, every, expected):
    assert RECORD_FILE_STEPS == 50
    callback = GradFlowCallback(tmp_path, every_n_steps=every)
    assert callback.records_per_file == expected
    assert GradFlowCallback(tmp_path, every_n_steps=every, records_per_file=3).records_per_file == 3


@pytest.mark.parametrize("value", [0, -2, 1.5, "many", None])
def test_a_bad_records_per_file_names_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match="monitor.records_per_file"):
        GradFlowCallback(tmp_path, every_n_steps=1, records_per_file=value)


def test_held_records_are_written_by_a_checkpoint_and_an_exception(tmp_path):
    callback = GradFlowCallback(tmp_path, every_n_steps=1, records_per_file=10)
    made = some_records(range(5))
    callback.unwritten[MODEL] = made[:3]
    callback.state_dict()  # what a checkpoint asks: the records held, on disk
    assert [p.name for p in record_files(tmp_path)] == ["steps_0000000-0000002.npz"]
    assert callback.unwritten == {}
    callback.unwritten[MODEL] = made[3:]
    callback.on_exception(None, None, RuntimeError("diverged"))
    assert records.load(tmp_path)["step"].tolist() == [0, 1, 2, 3, 4]


TINY = ["task.seq_len=5", "task.batch_size=4", "cell.hidden_size=4", "model.encoder_size=3",
        "task.train_batches=3", "task.val_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.progress_bar=null", "trainer.check_val_every_n_epoch=100"]


def train_tiny(run_dir, *overrides: str) -> None:
    from rnnlab.train import train

    try:
        train(compose_config([*TINY, *overrides], run_dir))
    finally:
        GlobalHydra.instance().clear()


def test_training_writes_packs_that_hold_what_one_file_a_step_holds(tmp_path):
    common = ["trainer.max_steps=7", "monitor.every_n_steps=1"]
    train_tiny(tmp_path / "packs", *common, "monitor.records_per_file=3")
    train_tiny(tmp_path / "files", *common, "monitor.records_per_file=1")
    assert [p.name for p in record_files(tmp_path / "packs" / "grad_flow")] == [
        "step_0000006.npz", "steps_0000000-0000002.npz", "steps_0000003-0000005.npz"]
    assert len(record_files(tmp_path / "files" / "grad_flow")) == 7
    packs, files = records.load(tmp_path / "packs"), records.load(tmp_path / "files")
    assert packs["step"].tolist() == list(range(7))
    assert_same_stack(packs, files)  # the same seed: the same training, the same numbers


def test_a_resume_inside_a_pack_carries_the_records_before_the_checkpoint(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    made = some_records(range(6))
    save_records(made[:4], old / "grad_flow")
    save_records(made[4:], old / "grad_flow")
    save_records(made[:4], old / "grad_flow" / "encoder.rnn")  # a watched module's
    carry_history(Checkpoint(path=old / "checkpoints" / "last.ckpt", run_dir=old, step=2,
                             last_val_step=-1), new, new / "grad_flow", None)
    for directory in (new / "grad_flow", new / "grad_flow" / "encoder.rnn"):
        carried = records.load(directory)
        assert carried["step"].tolist() == [0, 1]
        expected = records.load(old / "grad_flow")
        np.testing.assert_array_equal(carried["dL_dz"], expected["dL_dz"][:2])
    assert [p.name for p in record_files(new / "grad_flow")] == ["steps_0000000-0000001.npz"]
