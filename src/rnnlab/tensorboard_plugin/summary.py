"""The gradflow summaries: a record's arrays as TensorBoard tensor summaries, for the tab to read.

Format, version 1. Every value is a tensor summary (``Summary.Value.tensor``) whose metadata has
``plugin_data.plugin_name = "gradflow"``, ``data_class = DATA_CLASS_TENSOR`` and
``plugin_data.content`` = UTF-8 JSON ``{"version": 1, "kind": <kind>, "rows": [...] | null}``:

- kind ``profile``: a per-timestep array of the record (`is_profile_key`), float64 (T,), or
  (R, T) with ``rows`` naming the R rows (a watched torch.nn model's layers and directions);
  tag ``<prefix><key>``, e.g. ``dL_dz``, ``encoder.lstm/dL_dh``;
- kind ``summary``: a number of the record, float64 0-d, or (R,) with ``rows``; tag
  ``<prefix>summary/<key>``, e.g. ``summary/decay_rate``;
- kind ``record``: tag ``<prefix>record``, one per record: a 0-d string tensor holding the JSON
  ``{"tags": {<tag>: <shape>, ...}}`` of every tag the record wrote, so that the tab lists which
  steps each tag has, and its T, without reading the profiles;
- kind ``run_info``: tag ``run_info``, written once at step 0: a 0-d string tensor holding the JSON
  ``{"overrides": [...], "name": <str | null>}``, what configures the run (Hydra overrides such as
  ``cell.gain=0.9``); the tab names runs by the overrides that differ between them.

Values are float64 as recorded, NaN, ±inf and 0 included (the tab's routes turn non-finite values
into JSON ``null``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.proto.types_pb2 import DT_DOUBLE, DT_STRING


def use_fast_crc32c() -> bool:
    """Checksum TensorBoard's event records with google-crc32c's C implementation, where it is
    installed: TensorBoard without TensorFlow computes each record's CRC-32C in pure Python
    (~640 µs for 4 KB here, in the writer thread and holding the GIL, so a record of long
    profiles stalls training for milliseconds; ~0.4 µs in C). The same checksums, for writing
    and for reading (`tests/test_tensorboard_plugin.py` compares them). Returns whether it is
    in use."""
    try:
        import google_crc32c
    except ImportError:
        return False
    if google_crc32c.implementation != "c":
        return False
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    def crc32c(data) -> int:
        return google_crc32c.value(data if isinstance(data, bytes) else bytes(data))

    pywrap_tensorflow.crc32c = crc32c
    return True


FAST_CRC32C = use_fast_crc32c()

PLUGIN_NAME = "gradflow"
VERSION = 1
PROFILE, SUMMARY, RECORD, RUN_INFO = "profile", "summary", "record", "run_info"
RUN_INFO_TAG = "run_info"
RECORD_TAG = "record"
SUMMARY_PREFIX = "summary/"
# Record keys that are not written as values: the event's step is the record's step, a profile's
# length is its T, and the rows' names (a watched model's) go into the metadata.
NOT_WRITTEN = ("step", "T", "rows")


def is_profile_key(key: str) -> bool:
    """Whether record key ``key`` holds one value per timestep t: ``dL_dz``, ``dL_d<state>``,
    ``dL_dW_<module>``, ``jacobian_norm``, ``lyapunov_prediction``."""
    return key.startswith("dL_d") or key in ("jacobian_norm", "lyapunov_prediction")


@dataclass(frozen=True)
class Content:
    """What the metadata of one gradflow tag says about its tensors."""

    kind: str  # PROFILE, SUMMARY, RECORD or RUN_INFO
    rows: tuple[str, ...] | None  # names of the rows of a 2-D profile or a 1-D summary
    version: int = VERSION


def metadata(kind: str, rows: list[str] | tuple[str, ...] | None = None) -> SummaryMetadata:
    """The metadata of a gradflow tag of ``kind`` (and ``rows``): made once per kind and rows
    (`summary.value.add` copies it)."""
    return _metadata(kind, tuple(rows) if rows is not None else None)


@lru_cache(maxsize=256)
def _metadata(kind: str, rows: tuple[str, ...] | None) -> SummaryMetadata:
    content = {"version": VERSION, "kind": kind, "rows": list(rows) if rows is not None else None}
    return SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                               content=json.dumps(content).encode()),
        data_class=DATA_CLASS_TENSOR)


def float64_tensor(array: np.ndarray) -> TensorProto:
    """The tensor proto `tensor_util.make_tensor_proto` makes of a float64 array, made directly
    (about 3 against 15 µs a value; a record writes dozens every monitored step): the values'
    bytes as ``tensor_content`` when there are several, else ``double_val``."""
    proto = TensorProto(dtype=DT_DOUBLE, tensor_shape=TensorShapeProto(
        dim=[TensorShapeProto.Dim(size=n) for n in array.shape]))
    if array.size > 1:
        proto.tensor_content = array.tobytes()
    else:
        proto.double_val.extend(array.ravel().tolist())
    return proto


def string_tensor(text: str) -> TensorProto:
    """The 0-d string tensor proto `tensor_util.make_tensor_proto` makes of ``text``, made
    directly (it goes through numpy and a dtype lookup: a fifth of a record's summary)."""
    return TensorProto(dtype=DT_STRING, tensor_shape=TensorShapeProto(),
                       string_val=[text.encode()])


def parse_content(content: bytes) -> Content:
    """The `Content` of a tag from its metadata's ``plugin_data.content``."""
    parsed = json.loads(content.decode())
    rows = parsed.get("rows")
    return Content(kind=parsed["kind"], rows=tuple(rows) if rows is not None else None,
                   version=int(parsed.get("version", VERSION)))


def record_summary(record: dict[str, np.ndarray | float], prefix: str = "",
                   rows: list[str] | None = None) -> Summary:
    """The tensor summaries of one record: one value per profile key and per number, and the
    ``<prefix>record`` value listing them.

    Args:
        record: key → value as in a ``grad_flow/step_*.npz`` record (``Record.arrays()``).
            Profile keys (`is_profile_key`) hold (T,) arrays, or (R, T) with ``rows``; other keys
            hold numbers, or (R,) arrays with ``rows``. Not written as values: ``step``, ``T``
            and ``rows`` (`NOT_WRITTEN`), and arrays indexed by neither t nor a row (e.g.
            ``recurrent_singular_values``, (H,)).
        prefix: put before each tag: a watched model's module path and "/", e.g.
            ``"encoder.lstm/"``; "" for the model's own state.
        rows: names of the R rows of a watched model's 2-D profiles and 1-D summaries, e.g.
            ``["l0", "l0_reverse", "l1"]``; default: the record's own ``rows``.
    """
    if rows is None and "rows" in record:
        rows = [str(r) for r in np.asarray(record["rows"]).tolist()]
    summary = Summary()
    shapes = {}
    for key, value in record.items():
        if key in NOT_WRITTEN or np.asarray(value).dtype.kind == "U":  # names: source_<field>
            continue
        array = np.asarray(value, dtype=np.float64)
        if is_profile_key(key):
            if array.ndim == 2:
                check_rows(key, array, rows)
            elif array.ndim != 1:
                raise ValueError(f"record[{key!r}] must be (T,) or (R, T) with rows, got shape "
                                 f"{array.shape}")
            kind, tag, row_names = PROFILE, prefix + key, rows if array.ndim == 2 else None
        elif array.ndim == 0:
            kind, tag, row_names = SUMMARY, prefix + SUMMARY_PREFIX + key, None
        elif array.ndim == 1 and rows is not None and len(array) == len(rows):
            kind, tag, row_names = SUMMARY, prefix + SUMMARY_PREFIX + key, rows
        else:
            continue  # indexed by neither t nor a row: kept in the npz record only
        summary.value.add(tag=tag, tensor=float64_tensor(array),
                          metadata=metadata(kind, row_names))
        shapes[tag] = list(array.shape)
    summary.value.add(tag=prefix + RECORD_TAG,
                      tensor=string_tensor(json.dumps({"tags": shapes})),
                      metadata=metadata(RECORD))
    return summary


def check_rows(key: str, array: np.ndarray, rows: list[str] | None) -> None:
    if rows is None or len(rows) != array.shape[0]:
        raise ValueError(f"record[{key!r}] has shape {array.shape}: a 2-D profile needs one row "
                         f"name per row, got rows={rows!r}")


def run_info_summary(overrides: list[str], name: str | None = None) -> Summary:
    """Written once at step 0: what configures this run (Hydra overrides such as
    ``cell.gain=0.9``), and optionally a name for it."""
    text = json.dumps({"overrides": [str(o) for o in overrides], "name": name})
    summary = Summary()
    summary.value.add(tag=RUN_INFO_TAG, tensor=string_tensor(text),
                      metadata=metadata(RUN_INFO))
    return summary


def parse_json(value: np.ndarray) -> dict:
    """The JSON of a ``record`` or ``run_info`` tensor as read back."""
    text = value.item()
    return json.loads(text.decode() if isinstance(text, bytes) else text)


def write(writer, step: int, summary: Summary, walltime: float | None = None) -> None:
    """Add ``summary`` at ``step`` to the event file of ``writer``: a
    ``torch.utils.tensorboard.SummaryWriter`` (what Lightning's ``TensorBoardLogger.experiment``
    is) or anything with ``add_summary(summary, step, walltime)``; ``walltime`` None: now."""
    file_writer = writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer
    file_writer.add_summary(summary, step, walltime)


def write_record(writer, step: int, record: dict[str, np.ndarray | float], prefix: str = "",
                 rows: list[str] | None = None) -> None:
    """`write` the `record_summary` of ``record`` at ``step``."""
    write(writer, step, record_summary(record, prefix, rows))
