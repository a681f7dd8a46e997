"""The gradflow TensorBoard plugin: its summaries, and a real TensorBoard server serving them.

Every served number is compared with the record it was written from: float64 through JSON must
arrive unchanged, non-finite values as null, an underflowed 0 as 0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR
from tensorboard.util import tensor_util
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import rnnlab
from rnnlab.records import Record, read_records, record_files
from rnnlab.tensorboard_plugin import GradFlowLoader, summary
from rnnlab.tensorboard_plugin.labels import short_labels
from rnnlab.train import train

from .helpers.tensorboard_tab import get, has_records, synthetic_record, tensorboard, write_run
from .test_callback import lstm_classifier

T = 16
STEPS = list(range(0, 60, 5))  # 12 records: TensorBoard keeps 10 of a plugin it does not know
GAINS = (0.9, 1.1)
ROWS = ["layer0", "layer0_reverse"]  # a bidirectional one-layer torch.nn.LSTM
WATCHED = "encoder.lstm/"


def as_json(values) -> list:
    """What JSON can carry of float64 values: null for NaN and ±inf."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values).tolist()]


def watched_record(step: int) -> dict:
    """A watched torch.nn.LSTM's record: (R, T) profiles, an (R,) summary."""
    t = np.arange(T, dtype=np.float64)
    return {"dL_dh": np.stack([0.5 ** (T - 1 - t), 0.25 ** t]) * (1 + step),
            "dL_dc": np.stack([1e-300 * 0.1 ** t, np.full(T, 2.0)]),
            "decay_rate": np.array([math.log10(0.5), math.log10(0.25)])}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> tuple[Path, dict]:
    """Two runs of a gain sweep (the first also watching an LSTM), and a run written by another
    writer: no run_info, no record values. Returns the logdir and run → step → record."""
    root = tmp_path_factory.mktemp("logdir")
    runs = {}
    for i, gain in enumerate(GAINS):
        run = f"{i}_cell.gain={gain}"
        runs[run] = {s: synthetic_record(s, T, gain) for s in STEPS}
        write_run(root / run, ["cell=rnn", f"cell.gain={gain}", f"task.seq_len={T}"], runs[run])
    writer = SummaryWriter(str(root / "0_cell.gain=0.9"), filename_suffix=".watched")
    for s in STEPS:
        summary.write_record(writer, s, watched_record(s), prefix=WATCHED, rows=ROWS)
    writer.close()
    writer = SummaryWriter(str(root / "plain"))
    runs["plain"] = {s: synthetic_record(s, T, 1.0) for s in STEPS[:3]}
    for s, record in runs["plain"].items():
        written = summary.record_summary(record)
        kept = [v for v in written.value if v.tag != summary.RECORD_TAG]
        del written.value[:]
        written.value.extend(kept)
        summary.write(writer, s, written)
    writer.close()
    return root, runs


def loaded(runs: dict):
    """Whether /runs shows every record of ``runs`` and the watched model (loaded)."""
    return lambda body: len(body["runs"]) == len(runs) and all(
        len(r["tags"].get("dL_dz", {}).get("steps", [])) == len(runs[r["run"]])
        and (r["run"] != "0_cell.gain=0.9" or f"{WATCHED}dL_dh/layer0" in r["tags"])
        for r in body["runs"])


@pytest.fixture(scope="module")
def served(logdir):
    root, runs = logdir
    with tensorboard(root, "--load_fast=false", ready=loaded(runs)) as port:
        yield port, runs


def runs_by_name(port: int) -> dict:
    return {r["run"]: r for r in get(port, "/data/plugin/gradflow/runs")["runs"]}


# --- the writer side, without a server ------------------------------------------------------------
def test_record_summary_writes_profiles_summaries_and_the_record_of_its_tags():
    record = {**synthetic_record(5, T, 0.9), "recurrent_singular_values": np.ones(8)}
    values = {v.tag: v for v in summary.record_summary(record).value}
    profiles = {"dL_dz", "dL_dW_cell"}
    numbers = {"loss", "decay_rate", "predicted_decay_rate", "log10_first_last", "horizon"}
    assert set(values) == profiles | {f"summary/{k}" for k in numbers} | {"record"}
    for tag, value in values.items():
        content = summary.parse_content(value.metadata.plugin_data.content)
        assert value.metadata.plugin_data.plugin_name == "gradflow"
        assert value.metadata.data_class == DATA_CLASS_TENSOR
        assert content.kind == ("profile" if tag in profiles else
                                "record" if tag == "record" else "summary")
    np.testing.assert_array_equal(tensor_util.make_ndarray(values["dL_dz"].tensor),
                                  record["dL_dz"])
    assert tensor_util.make_ndarray(values["summary/loss"].tensor) == record["loss"]
    listed = summary.parse_json(tensor_util.make_ndarray(values["record"].tensor))["tags"]
    assert listed == {tag: [T] if tag in profiles else [] for tag in values if tag != "record"}


def test_a_watched_models_record_file_names_its_rows():
    saved = Record(step=3, profiles={"dL_dh": watched_record(3)["dL_dh"],
                                     "dL_dc": watched_record(3)["dL_dc"]}, rows=tuple(ROWS),
                   loss=0.5).arrays()  # what grad_flow/encoder.lstm/step_0000003.npz holds
    values = {v.tag: v for v in summary.record_summary(saved, prefix=WATCHED).value}
    for key in ("dL_dh", "dL_dc"):
        content = summary.parse_content(values[WATCHED + key].metadata.plugin_data.content)
        assert content == summary.Content(kind="profile", rows=tuple(ROWS))
        np.testing.assert_array_equal(tensor_util.make_ndarray(values[WATCHED + key].tensor),
                                      saved[key])
    rates = values[f"{WATCHED}summary/decay_rate"]
    assert summary.parse_content(rates.metadata.plugin_data.content).rows == tuple(ROWS)
    np.testing.assert_array_equal(tensor_util.make_ndarray(rates.tensor), saved["decay_rate"])
    assert f"{WATCHED}summary/rows" not in values and f"{WATCHED}summary/step" not in values


def test_a_2d_profile_needs_a_name_per_row():
    with pytest.raises(ValueError, match=r"dL_dh.*\(2, 16\).*one row name per row"):
        summary.record_summary(watched_record(0), prefix=WATCHED, rows=["layer0"])


def test_labels_name_runs_by_the_overrides_that_differ():
    infos = {"a": {"overrides": ["cell=rnn", "cell.gain=0.9", "task.seq_len=50"]},
             "b": {"overrides": ["cell=rnn", "cell.gain=1.1", "task.seq_len=50"]},
             "c": {"overrides": ["cell=rnn", "cell.gain=1.1", "task.seq_len=50", "+seed=3"]},
             "d": None}
    assert short_labels(infos) == {"a": "cell.gain=0.9", "b": "cell.gain=1.1",
                                   "c": "cell.gain=1.1 +seed=3", "d": "d"}
    same = {"x": {"overrides": ["cell.gain=1"]}, "y": {"overrides": ["cell.gain=1"]}}
    assert short_labels(same) == {"x": "x", "y": "y"}  # nothing differs: the run names
    named = {"x": {"overrides": [], "name": "baseline"}, "y": {"overrides": [], "name": "baseline"}}
    assert short_labels(named) == {"x": "baseline (x)", "y": "baseline (y)"}


def test_loader_keeps_every_gradflow_sample_unless_the_user_chose():
    flags = argparse.Namespace(samples_per_plugin={"images": 5})
    GradFlowLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"images": 5, "gradflow": 0}
    flags = argparse.Namespace(samples_per_plugin={"gradflow": 7})
    GradFlowLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"gradflow": 7}


# --- a real TensorBoard server ----------------------------------------------------------------
def test_plugins_listing_lists_the_gradient_flow_tab(served):
    port, _ = served
    listing = get(port, "/data/plugins_listing")["gradflow"]
    assert listing["enabled"]
    assert listing["tab_name"] == "Gradient flow"
    assert listing["loading_mechanism"] == {"type": "IFRAME",
                                            "module_path": "/data/plugin/gradflow/static/index.js"}


def test_the_frontend_module_its_imports_and_the_uplot_licence_are_served(served):
    port, _ = served
    base = "/data/plugin/gradflow/static/"
    pending, seen = ["index.js"], set()
    while pending:  # every module reachable from index.js
        name = pending.pop()
        seen.add(name)
        source = get(port, base + name).decode()
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for imported in re.findall(r'from "\./([^"]+)"', source):
            if folder + imported not in seen:
                pending.append(folder + imported)
    assert {"index.js", "uplot-1.6.32/uPlot.esm.js"} <= seen
    assert re.search(rb"export (async )?function render\(", get(port, base + "index.js"))
    assert b"MIT License" in get(port, base + "uplot-1.6.32/LICENSE")
    for sheet in ("style.css", "uplot-1.6.32/uPlot.min.css"):
        assert get(port, base + sheet)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(port, base + "../plugin.py")


def test_runs_lists_every_run_with_its_tags_steps_T_and_a_short_label(served):
    port, runs = served
    listed = runs_by_name(port)
    assert set(listed) == set(runs)
    for i, gain in enumerate(GAINS):
        run = listed[f"{i}_cell.gain={gain}"]
        assert run["label"] == f"cell.gain={gain}"  # the one override that differs
        assert run["overrides"] == ["cell=rnn", f"cell.gain={gain}", f"task.seq_len={T}"]
        for tag in ("dL_dz", "dL_dW_cell"):
            assert run["tags"][tag] == {"kind": "profile", "steps": STEPS, "T": T, "row": None}
        for key in ("loss", "decay_rate", "predicted_decay_rate", "log10_first_last", "horizon"):
            assert run["tags"][f"summary/{key}"] == {"kind": "summary", "steps": STEPS,
                                                     "row": None}
    assert listed["plain"]["label"] == "plain"  # no run_info: named by its directory


def test_profile_returns_every_record_exactly(served):
    port, runs = served
    for run, records in runs.items():
        for tag in ("dL_dz", "dL_dW_cell"):
            body = get(port, "/data/plugin/gradflow/profile", run=run, tag=tag)
            assert body["steps"] == sorted(records)
            assert body["T"] == T
            assert body["values"] == [as_json(records[s][tag]) for s in sorted(records)]
    zero_first = get(port, "/data/plugin/gradflow/profile", run="1_cell.gain=1.1", tag="dL_dz")
    assert zero_first["values"][1][0] == 0  # step 5: an underflowed gradient stays 0
    nonfinite = get(port, "/data/plugin/gradflow/profile", run="1_cell.gain=1.1",
                    tag="dL_dW_cell")
    assert nonfinite["values"][0][T // 2: T // 2 + 2] == [None, None]  # NaN, inf at step 0


def test_profile_as_float64_bytes_is_every_record_bit_for_bit(served):
    port, runs = served
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/gradflow/profile?"
        + urllib.parse.urlencode({"run": "0_cell.gain=0.9", "tag": "dL_dW_cell",
                                  "format": "float64"}))
    with urllib.request.urlopen(request, timeout=60) as response:
        steps = [int(s) for s in response.headers["X-Gradflow-Steps"].split(",")]
        assert int(response.headers["X-Gradflow-T"]) == T
        values = np.frombuffer(response.read(), dtype="<f8").reshape(len(steps), T)
    assert steps == STEPS
    expected = np.stack([runs["0_cell.gain=0.9"][s]["dL_dW_cell"] for s in STEPS])
    assert values.tobytes() == expected.astype("<f8").tobytes()  # NaN and inf included


def test_gzipped_json_is_the_same_json(served):
    port, _ = served
    query = urllib.parse.urlencode({"run": "1_cell.gain=1.1", "tag": "dL_dW_cell"})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/gradflow/profile?{query}",
        headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        body = json.loads(gzip.decompress(response.read()))
    assert body == get(port, "/data/plugin/gradflow/profile", run="1_cell.gain=1.1",
                       tag="dL_dW_cell")


def test_profile_at_a_step_returns_that_record_only(served):
    port, runs = served
    record = runs["0_cell.gain=0.9"][25]
    body = get(port, "/data/plugin/gradflow/profile", run="0_cell.gain=0.9", tag="dL_dz", step=25)
    assert body["steps"] == [25]
    assert body["values"] == [as_json(record["dL_dz"])]


def test_a_watched_models_rows_are_profiles_of_their_own(served):
    port, _ = served
    run = runs_by_name(port)["0_cell.gain=0.9"]
    for key in ("dL_dh", "dL_dc"):
        for i, row in enumerate(ROWS):
            tag = f"{WATCHED}{key}/{row}"
            assert run["tags"][tag] == {"kind": "profile", "steps": STEPS, "T": T, "row": row}
            body = get(port, "/data/plugin/gradflow/profile", run=run["run"], tag=tag)
            assert body["values"] == [as_json(watched_record(s)[key][i]) for s in STEPS]
    summaries = get(port, "/data/plugin/gradflow/summaries", run=run["run"])["tags"]
    for i, row in enumerate(ROWS):
        served_rates = summaries[f"{WATCHED}summary/decay_rate/{row}"]
        assert served_rates == {"steps": STEPS, "values": [math.log10((0.5, 0.25)[i])] * 12}


def test_summaries_return_every_recorded_number(served):
    port, runs = served
    for run, records in runs.items():
        tags = get(port, "/data/plugin/gradflow/summaries", run=run)["tags"]
        for key in ("loss", "decay_rate", "predicted_decay_rate", "log10_first_last", "horizon"):
            assert tags[f"summary/{key}"] == {"steps": sorted(records),
                                              "values": [records[s][key] for s in sorted(records)]}


@pytest.mark.parametrize(("query", "status", "named"), [
    ({"tag": "dL_dz"}, "400", "'run' is required"),
    ({"run": "0_cell.gain=0.9"}, "400", "'tag' is required"),
    ({"run": "0_cell.gain=0.9", "tag": "dL_dq"}, "404", "no profile tag 'dL_dq'"),
    ({"run": "nobody", "tag": "dL_dz"}, "404", "no gradflow data for run 'nobody'"),
    ({"run": "0_cell.gain=0.9", "tag": "dL_dz", "step": "last"}, "400", "step must be an integer"),
    ({"run": "0_cell.gain=0.9", "tag": "dL_dz", "step": "7"}, "404", "no 'dL_dz' at step 7"),
    ({"run": "0_cell.gain=0.9", "tag": "dL_dz", "format": "csv"}, "400",
     "format must be json or float64"),
])
def test_a_bad_query_is_answered_with_what_is_wrong(served, query, status, named):
    port, _ = served
    with pytest.raises(urllib.error.HTTPError, match=status) as error:
        get(port, "/data/plugin/gradflow/profile", **query)
    assert named in error.value.read().decode()


def test_the_default_data_server_keeps_every_record_too(logdir):
    root, runs = logdir
    with tensorboard(root, ready=loaded(runs)) as port:  # TensorBoard's default reader
        body = get(port, "/data/plugin/gradflow/profile", run="1_cell.gain=1.1", tag="dL_dz")
    assert body["steps"] == STEPS
    assert body["values"] == [as_json(runs["1_cell.gain=1.1"][s]["dL_dz"]) for s in STEPS]


# --- a trained run ----------------------------------------------------------------------------
TRAINED = ["task.seq_len=12", "trainer.max_steps=4", "monitor.every_n_steps=2",
           "monitor.jacobian_every_n_steps=2"]


def npz_records(run: Path) -> dict[int, dict]:
    """step → the record the monitor saved, as written to disk."""
    records = {}
    for path in sorted(run.glob("**/grad_flow/step_*.npz")):
        with np.load(path) as saved:
            record = {k: saved[k] for k in saved.files}
        records[int(record["step"])] = record
    return records


def check_served_records(port: int, records: dict[int, dict]) -> None:
    (run,) = runs_by_name(port).values()
    steps = sorted(records)
    profiles = [k for k in records[steps[0]] if summary.is_profile_key(k)]
    assert {"dL_dz", "dL_dW_cell", "jacobian_norm"} <= set(profiles)
    for key in profiles:
        body = get(port, "/data/plugin/gradflow/profile", run=run["run"], tag=key)
        assert body["steps"] == steps
        assert body["values"] == [as_json(records[s][key]) for s in steps]
    summaries = get(port, "/data/plugin/gradflow/summaries", run=run["run"])["tags"]
    for key in ("loss", "decay_rate", "log10_first_last", "horizon", "grad_norm_cell"):
        assert summaries[f"summary/{key}"]["values"] == [float(records[s][key]) for s in steps]


def test_the_monitor_writes_the_gradflow_summaries_of_every_record(make_cfg, tmp_path):
    train(make_cfg(*TRAINED))
    run = tmp_path / "run"
    records = npz_records(run)
    assert sorted(records) == [0, 2]
    with tensorboard(run, "--load_fast=false", ready=has_records(len(records), 1)) as port:
        check_served_records(port, records)
        (served,) = runs_by_name(port).values()
    assert served["label"] == served["run"]  # no Hydra job, no run_info: named by its directory


def test_a_watched_models_rows_and_its_run_info_reach_the_tab(tmp_path):
    """A user's LightningModule with a 2-layer torch.nn.LSTM: each layer's ||dL/dh_t||,
    ||dL/dc_t|| served as its own profile, equal to the npz records; the callback's run_info
    names the runs."""
    for lr in (0.1, 0.01):
        pl.seed_everything(0)
        out = tmp_path / f"lr={lr}"
        model = lstm_classifier.LSTMClassifier(features=3, hidden=5, lr=lr).double()
        data = lstm_classifier.first_sign_data(12, 7, 3)
        data.tensors = (data.tensors[0].double(), data.tensors[1])
        callback = rnnlab.GradFlowCallback(out / "grad_flow", every_n_steps=1,
                                           run_info=["hidden=5", f"lr={lr}"])
        trainer = pl.Trainer(max_steps=3, logger=TensorBoardLogger(out, name="", version=""),
                             callbacks=[callback], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, DataLoader(data, batch_size=4))
    loaded = lambda body: len(body["runs"]) == 2 and all(  # noqa: E731
        len(r["tags"].get("lstm/dL_dh/l1", {}).get("steps", [])) == 3 for r in body["runs"])
    with tensorboard(tmp_path, "--load_fast=false", ready=loaded) as port:
        runs = runs_by_name(port)
        assert {run: r["label"] for run, r in runs.items()} == {"lr=0.1": "lr=0.1",
                                                                "lr=0.01": "lr=0.01"}
        for run in runs:
            records = {}
            for path in record_files(tmp_path / run / "grad_flow" / "lstm"):
                for saved in read_records(path):  # packs: every step is monitored
                    records[int(saved["step"])] = saved
            assert sorted(records) == [0, 1, 2]
            rows = [str(r) for r in records[0]["rows"]]
            assert rows == ["l0", "l1"]
            for key in ("dL_dh", "dL_dc"):
                for i, row in enumerate(rows):
                    body = get(port, "/data/plugin/gradflow/profile", run=run,
                               tag=f"lstm/{key}/{row}")
                    assert body["steps"] == [0, 1, 2] and body["T"] == 7
                    assert body["values"] == [as_json(records[s][key][i]) for s in (0, 1, 2)]


@pytest.mark.parametrize("array", [
    np.float64(0.25), np.array(-0.0), np.array(math.nan), np.array([math.inf]), np.zeros(0),
    np.array([1e-300, -2.5, math.nan, -math.inf, 0.0]), np.arange(12.0).reshape(3, 4),
    np.arange(12.0).reshape(4, 3).T,  # not C-contiguous
], ids=lambda a: str(np.shape(a)))
def test_the_float64_tensor_proto_is_tensorboards_own(array):
    array = np.asarray(array, dtype=np.float64)
    made = summary.float64_tensor(array)
    assert made == tensor_util.make_tensor_proto(array)
    np.testing.assert_array_equal(tensor_util.make_ndarray(made), array)



@pytest.mark.parametrize("text", ["", '{"tags": {"dL_dz": [7]}}', "ünïcödé ∂L/∂z_t"])
def test_the_string_tensor_proto_is_tensorboards_own(text):
    made = summary.string_tensor(text)
    assert made == tensor_util.make_tensor_proto(text)
    assert tensor_util.make_ndarray(made).item().decode() == text


def test_event_checksums_are_tensorboards_own_in_c():
    """The C CRC-32C rnnlab hands TensorBoard gives its pure-Python checksums (kept in
    `crc_update`/`crc_finalize`), masked and unmasked, so event files read back."""
    import random

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub

    assert summary.FAST_CRC32C and stub.crc32c.__module__ == summary.__name__
    generator = random.Random(0)
    for size in (0, 1, 7, 100, 4096):
        data = bytes(generator.randrange(256) for _ in range(size))
        python = stub.crc_finalize(stub.crc_update(stub.CRC_INIT, data))
        assert stub.crc32c(data) == python
        assert stub.masked_crc32c(data) == stub.u32(((python >> 15) | stub.u32(python << 17))
                                                    + 0xA282EAD8)
    assert stub.crc32c(bytearray(b"abc")) == stub.crc_finalize(stub.crc_update(stub.CRC_INIT,
                                                                                b"abc"))
