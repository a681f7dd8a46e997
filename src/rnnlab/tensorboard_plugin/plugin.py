"""GradFlowPlugin: the "Gradient flow" tab's backend, JSON routes over TensorBoard's data provider.

Routes (under ``/data/plugin/gradflow``; README and docs/tensorboard_tab.md have their full form):

- ``/runs``: every run with its gradflow tags (kind, row, steps, T) and its short label;
- ``/profile?run=&tag=[&step=][&format=float64]``: one profile tag of one run, ``{"steps", "T",
  "values"}``, (steps, T), or only its record at ``step``; ``format=float64``: the values as raw
  float64 bytes (what the tab reads: no float formatting or parsing);
- ``/summaries?run=``: every summary tag of one run over training;
- ``/static/*``: the frontend (an ES module, ``static/index.js``) and the vendored uPlot.

Everything is read through ``context.data_provider`` (so remote logdirs work) and every record is
returned: TensorBoard keeps every gradflow sample (`GradFlowLoader` sets
``--samples_per_plugin gradflow=0`` unless the user set it) and the reads ask for `ALL_RECORDS`.
A 2-D tag (a watched model's (R, T) profiles) is listed as one tag per row, ``<tag>/<row>``, so
every profile is (steps, T). JSON has no NaN: non-finite values are ``null``.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import mimetypes
from importlib import resources

import numpy as np
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from rnnlab.tensorboard_plugin.labels import short_labels
from rnnlab.tensorboard_plugin.summary import (
    PLUGIN_NAME,
    PROFILE,
    RECORD,
    RUN_INFO,
    SUMMARY,
    VERSION,
    Content,
    parse_content,
    parse_json,
)

log = logging.getLogger(__name__)

# The most records a read returns: data providers downsample every read to a count; this one is
# above any run's number of monitored steps, so no record is ever dropped.
ALL_RECORDS = 1_000_000_000
STATIC = resources.files(__package__) / "static"
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", "": "text/plain"}


def json_list(values: np.ndarray) -> list:
    """``values`` as nested lists of floats, ``None`` where not finite (JSON has no NaN, inf).
    Python's float repr is the shortest that round-trips, so a float64 arrives unchanged."""
    if np.isfinite(values).all():
        return values.tolist()
    if values.ndim > 1:
        return [json_list(row) for row in values]
    return [v if math.isfinite(v) else None for v in values.tolist()]


def respond_json(request, body: dict):
    """``body`` as JSON, gzipped at level 1 where the client takes gzip: TensorBoard's own level
    3 takes ~55 ms on a sweep's profile (40 records × T = 1000), level 1 a third of that."""
    content = json.dumps(body, allow_nan=False).encode()
    if "gzip" not in request.headers.get("Accept-Encoding", ""):
        return http_util.Respond(request, content, "application/json")
    return http_util.Respond(request, gzip.compress(content, compresslevel=1, mtime=0),
                             "application/json", content_encoding="gzip")


def respond_float64(request, steps: list[int], T: int, rows: list[np.ndarray]):
    """The (steps, T) values as little-endian float64 bytes, row after row (NaN and ±inf as
    they are; a row shorter than T padded with NaN), the steps and T in headers: 8 bytes a value
    where JSON takes ~20, and nothing to format or parse (T = 10,000 × 100 records: 8 MB)."""
    values = np.full((len(rows), T), np.nan, dtype="<f8")
    for i, r in enumerate(rows):
        values[i, :len(r)] = r
    return http_util.Respond(request, values.tobytes(), "application/octet-stream", headers=[
        ("X-Gradflow-Steps", ",".join(map(str, steps))), ("X-Gradflow-T", str(T))])


class GradFlowPlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self.data_provider = context.data_provider
        # (experiment, run) → tag → Content as last listed: a tag's metadata is fixed by its
        # first value, so /profile reads a listed tag without listing again (a data-server
        # call costs ~40 ms).
        self.listed: dict[tuple[str, str], dict[str, Content]] = {}
        self.static_files = dict(_walk(STATIC))  # what /static/* may serve

    def get_plugin_apps(self) -> dict:
        return {"/runs": self.runs_route, "/profile": self.profile_route,
                "/summaries": self.summaries_route, "/static/*": self.static_route}

    def is_active(self) -> bool:
        return False  # active where the data provider lists gradflow data (TensorBoard asks it)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js",
                                            tab_name="Gradient flow", disable_reload=True)

    # --- reading through the data provider ---------------------------------------------------
    def contents(self, ctx, experiment: str,
                 runs: list[str] | None = None) -> dict[str, dict[str, Content]]:
        """run → tag → `Content` of every gradflow tag this version can read (of ``runs``)."""
        listing = self.data_provider.list_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=runs) if runs else None)
        index: dict[str, dict[str, Content]] = {}
        for run, tags in listing.items():
            for tag, series in tags.items():
                try:
                    content = parse_content(series.plugin_content)
                except (ValueError, KeyError) as error:
                    log.warning("gradflow: run %r tag %r has unreadable metadata (%s); skipped",
                                run, tag, error)
                    continue
                if content.version <= VERSION:
                    index.setdefault(run, {})[tag] = content
        for run, tags in index.items():
            self.listed[(experiment, run)] = tags
        return index

    def read(self, ctx, experiment: str, runs: list[str] | None,
             tags: list[str] | None) -> dict[str, dict[str, list]]:
        """run → tag → every `TensorDatum` (step, numpy), by step."""
        return self.data_provider.read_tensors(
            ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME, downsample=ALL_RECORDS,
            run_tag_filter=provider.RunTagFilter(runs=runs, tags=tags))

    def recorded(self, ctx, experiment: str, index: dict[str, dict[str, Content]]):
        """run → run_info (or None), and run → tag → [(step, shape)] of every value written.

        Read from the small ``record`` and ``run_info`` values only: reading every profile to
        list its steps costs ~0.5 s for a 24-run sweep. Tags written without a ``record`` value
        are read themselves."""
        small = sorted({tag for tags in index.values() for tag, content in tags.items()
                        if content.kind in (RECORD, RUN_INFO)})
        data = self.read(ctx, experiment, sorted(index), small) if small else {}
        infos, shapes = {}, {}
        parsed: dict[bytes, dict] = {}  # a run's records mostly list the same tags
        for run in index:
            infos[run], shapes[run] = None, {}
            for tag, datums in data.get(run, {}).items():
                if index[run][tag].kind == RUN_INFO:
                    infos[run] = parse_json(datums[0].numpy) if datums else None
                    continue
                for datum in datums:
                    text = datum.numpy.item()
                    if text not in parsed:
                        parsed[text] = parse_json(datum.numpy)["tags"]
                    for listed, shape in parsed[text].items():
                        shapes[run].setdefault(listed, []).append((int(datum.step), shape))
            unlisted = sorted(tag for tag, content in index[run].items()
                              if content.kind in (PROFILE, SUMMARY) and tag not in shapes[run])
            if unlisted:
                for tag, datums in self.read(ctx, experiment, [run], unlisted).get(run, {}).items():
                    shapes[run][tag] = [(int(d.step), list(d.numpy.shape)) for d in datums]
        return infos, shapes

    # --- routes ---------------------------------------------------------------------------------
    @wrappers.Request.application
    def runs_route(self, request):
        ctx, experiment = plugin_util.context(request.environ), plugin_util.experiment_id(
            request.environ)
        index = self.contents(ctx, experiment)
        infos, shapes = self.recorded(ctx, experiment, index)
        labels = short_labels(infos)
        runs = []
        for run in sorted(index):
            tags = {}
            for tag, content in sorted(index[run].items()):
                if content.kind not in (PROFILE, SUMMARY):
                    continue
                written = shapes[run].get(tag, [])
                described = {"kind": content.kind, "steps": [step for step, _ in written]}
                if content.kind == PROFILE:
                    described["T"] = max((shape[-1] for _, shape in written), default=0)
                for row in content.rows or [None]:
                    tags[tag if row is None else f"{tag}/{row}"] = {**described, "row": row}
            info = infos[run] or {}
            runs.append({"run": run, "label": labels[run], "overrides": info.get("overrides"),
                         "name": info.get("name"), "tags": tags})
        return respond_json(request, {"runs": runs})

    @wrappers.Request.application
    def profile_route(self, request):
        run, tag = required(request, "run"), required(request, "tag")
        step = request.args.get("step")
        if step is not None and not step.lstrip("-").isdigit():
            raise errors.InvalidArgumentError(f"step must be an integer, got {step!r}")
        ctx, experiment = plugin_util.context(request.environ), plugin_util.experiment_id(
            request.environ)
        try:
            stored, row = resolve(self.listed.get((experiment, run), {}), tag, PROFILE)
        except errors.NotFoundError:  # not listed yet: list the run again
            index = self.contents(ctx, experiment, [run]).get(run)
            if index is None:
                raise errors.NotFoundError(f"no gradflow data for run {run!r}") from None
            stored, row = resolve(index, tag, PROFILE)
        datums = self.read(ctx, experiment, [run], [stored]).get(run, {}).get(stored, [])
        if step is not None:  # one record: what the chart draws first, before the whole tag
            datums = [d for d in datums if d.step == int(step)]
            if not datums:
                raise errors.NotFoundError(f"run {run!r} has no {tag!r} at step {step}")
        rows = [np.asarray(d.numpy if row is None else d.numpy[row], dtype=np.float64)
                for d in datums]
        steps = [int(d.step) for d in datums]
        T = max((len(r) for r in rows), default=0)
        if request.args.get("format", "json") == "float64":
            return respond_float64(request, steps, T, rows)
        if request.args.get("format", "json") != "json":
            raise errors.InvalidArgumentError(
                f"format must be json or float64, got {request.args.get('format')!r}")
        return respond_json(request, {"run": run, "tag": tag, "steps": steps, "T": T,
                                      "values": [json_list(r) for r in rows]})

    @wrappers.Request.application
    def summaries_route(self, request):
        run = required(request, "run")
        ctx, experiment = plugin_util.context(request.environ), plugin_util.experiment_id(
            request.environ)
        index = self.contents(ctx, experiment, [run]).get(run)
        if index is None:
            raise errors.NotFoundError(f"no gradflow data for run {run!r}")
        stored = sorted(tag for tag, content in index.items() if content.kind == SUMMARY)
        data = self.read(ctx, experiment, [run], stored).get(run, {}) if stored else {}
        tags = {}
        for tag in stored:
            datums = data.get(tag, [])
            steps = [int(d.step) for d in datums]
            values = np.array([d.numpy for d in datums], dtype=np.float64)
            rows = index[tag].rows
            if rows is None:
                tags[tag] = {"steps": steps, "values": json_list(values)}
            else:  # (steps, R): one series per row
                for i, name in enumerate(rows):
                    tags[f"{tag}/{name}"] = {"steps": steps, "values": json_list(values[:, i])}
        return respond_json(request, {"run": run, "tags": tags})

    @wrappers.Request.application
    def static_route(self, request):
        name = request.path.split("/static/", 1)[1]
        path = self.static_files.get(name)
        if path is None:
            raise errors.NotFoundError(f"no static file {name!r}")
        suffix = "." + name.rsplit(".", 1)[1] if "." in name else ""
        content_type = CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "text/plain"
        return http_util.Respond(request, path.read_bytes(), content_type)


def required(request, name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise errors.InvalidArgumentError(f"the query parameter {name!r} is required")
    return value


def resolve(index: dict[str, Content], tag: str, kind: str) -> tuple[str, int | None]:
    """The stored tag behind listed tag ``tag``, and the row it names (``<tag>/<row>`` of a
    2-D tag) or None."""
    content = index.get(tag)
    if content is not None and content.kind == kind and content.rows is None:
        return tag, None
    stored, _, row = tag.rpartition("/")
    content = index.get(stored)
    if content is not None and content.kind == kind and content.rows and row in content.rows:
        return stored, content.rows.index(row)
    raise errors.NotFoundError(f"no {kind} tag {tag!r} in this run")


def _walk(directory, prefix: str = ""):
    """(name relative to ``directory``, file) of every file below it."""
    for entry in directory.iterdir():
        if entry.is_dir():
            yield from _walk(entry, f"{prefix}{entry.name}/")
        elif not entry.name.startswith("."):
            yield prefix + entry.name, entry


class GradFlowLoader(base_plugin.TBLoader):
    """Loads `GradFlowPlugin`, keeping every gradflow sample: TensorBoard's default for a plugin
    it does not know keeps 10 samples per tag, which would drop records."""

    def fix_flags(self, flags) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(PLUGIN_NAME, 0)  # 0: keep all; a user's own setting wins

    def load(self, context: base_plugin.TBContext) -> GradFlowPlugin:
        return GradFlowPlugin(context)
