"""``mtrec export``: a run as one ONNX graph, raw feature columns in, ``p_<task>`` probabilities out.

The graph is the encoding subgraph (``export_encoding``: the run's own vocabularies and statistics,
the rules of ``encode``) in front of the network, exported by torch's TorchScript-based exporter
(``dynamo=False``: deterministic, no extra dependency, the same on torch 2.11 and 2.13) with a
dynamic batch axis. ``--codes`` exports the network alone, on the codes ``encode`` produces.
``onnx_inputs(frame, model_path)`` turns a Polars frame of a raw log into the feed dict by the
input convention (docs/serving.md). Needs ``pip install 'mtrec[export]'`` (onnx, onnxruntime).
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write, check_replaceable

OPSET = 17
ML_OPSET = 2
MARKER = ("mtrec", "export")  # metadata_props entry: --force replaces only files that carry it
MTREC_VERSION = "0.1.0"


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise UserError("mtrec export needs onnx: pip install 'mtrec[export]' (onnx, onnxruntime)") from err
    return onnx


class Probabilities(nn.Module):
    """The network with its outputs as predict writes them: sigmoid of each task's logit, and for
    ESMM ``p_ctcvr`` from the same stable CTCVR logit."""

    def __init__(self, model: nn.Module, num_tasks: int, esmm: tuple[int, int] | None):
        super().__init__()
        self.model, self.num_tasks, self.esmm = model, num_tasks, esmm

    def forward(self, codes: torch.Tensor, numeric: torch.Tensor):
        logits = self.model(codes, numeric).float()
        columns = [logits[:, t] for t in range(self.num_tasks)]
        if self.esmm is not None:
            cvr, ctr = self.esmm
            log_p = (nn.functional.logsigmoid(logits[:, cvr]) + nn.functional.logsigmoid(logits[:, ctr]))
            log_p = log_p.clamp_max(-1e-7)
            # 1 - exp for -expm1, which the exporter lacks: equal to ~1e-7 in p where p is near 1
            columns.append(log_p - torch.log(1.0 - torch.exp(log_p)))
        return tuple(torch.sigmoid(c) for c in columns)


def _network(model, schema, tasks, objective, outputs: list[str]):
    """The network as an ONNX ModelProto with inputs ``codes`` and ``numeric``."""
    onnx = _onnx()
    from mtrec.engine.build import feature_names

    categorical, numeric = feature_names(schema)
    width = len(schema.categorical_features) + sum(f.max_len for f in schema.sequence_features)
    codes = torch.zeros(2, width, dtype=torch.int32)
    values = torch.zeros(2, len(numeric))
    wrapper = Probabilities(model.cpu().eval(), len(tasks), objective.esmm).eval()
    buffer = io.BytesIO()
    axes = {name: {0: "N"} for name in ["codes", "numeric", *outputs]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (codes, values), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["codes", "numeric"], output_names=outputs, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def _check_out(out: Path, force: bool) -> None:
    check_replaceable(out, force, ".onnx", _written_by_export, "a model written by mtrec export")


def _written_by_export(path: Path) -> bool:
    model = _onnx().load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}.get(MARKER[0]) == MARKER[1]


def export_run(run_dir: str | Path, out: str | Path, *, which: str = "best", fmt: str = "onnx",
               codes_only: bool = False, force: bool = False) -> dict:
    """Write the run as one ONNX model; returns what the CLI prints."""
    onnx = _onnx()
    from onnx import helper

    from mtrec.engine.build import feature_names, objective_for
    from mtrec.engine.objective import CTCVR
    from mtrec.serving.encoder import run_encoder
    from mtrec.serving.evaluate import load_run
    from mtrec.serving.export_encoding import ML_DOMAIN, InputSpec, encoding_graph

    if fmt != "onnx":
        raise UserError(f"--format must be onnx, not {fmt!r}")
    out = Path(out)
    _check_out(out, force)
    model, cfg, tasks, run_schema = load_run(run_dir, which, "cpu")
    encoder = run_encoder(run_dir, cfg, run_schema)
    objective = objective_for(cfg, tasks)
    outputs = [f"p_{t}" for t in tasks] + ([f"p_{CTCVR}"] if objective.esmm else [])
    net = _network(model, run_schema, tasks, objective, outputs)
    if codes_only:
        width = len(run_schema.categorical_features) + sum(f.max_len for f in run_schema.sequence_features)
        specs = [InputSpec("codes", "int32", ["N", str(width)], "", "codes"),
                 InputSpec("numeric", "float32", ["N", str(len(run_schema.numeric_features))], "", "numeric")]
        merged = net
    else:
        enc = encoding_graph(run_schema, encoder.vocab_dir)
        specs = enc.inputs
        types = {"int64": onnx.TensorProto.INT64, "string": onnx.TensorProto.STRING,
                 "float64": onnx.TensorProto.DOUBLE, "bool": onnx.TensorProto.BOOL}
        graph = helper.make_graph(
            list(enc.nodes) + list(net.graph.node), "mtrec",
            [helper.make_tensor_value_info(s.name, types[s.dtype], s.shape) for s in specs],
            list(net.graph.output), initializer=list(enc.initializers) + list(net.graph.initializer))
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(ML_DOMAIN, ML_OPSET)]
        merged = helper.make_model(graph, opset_imports=opsets, ir_version=net.ir_version)
    merged.producer_name, merged.producer_version = "mtrec", MTREC_VERSION
    meta = {MARKER[0]: MARKER[1], "mtrec.version": MTREC_VERSION, "mtrec.format": "codes" if codes_only else "raw",
            "mtrec.inputs": json.dumps([s.to_dict() for s in specs]), "mtrec.outputs": json.dumps(outputs),
            "mtrec.tasks": json.dumps(tasks), "mtrec.fingerprint": encoder.fingerprint or "",
            "mtrec.run": str(Path(run_dir).resolve()), "mtrec.checkpoint": which,
            "mtrec.code_columns": json.dumps(dict(zip(("categorical", "numeric"), feature_names(run_schema))))}
    helper.set_model_props(merged, meta)
    onnx.checker.check_model(merged)
    if merged.ByteSize() >= 2**31 - 1:
        raise UserError("the model with its vocabularies exceeds ONNX's 2 GB single-file limit: export the "
                        "network alone with --codes")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save(merged, tmp))
    return {"out": str(out), "inputs": [s.name for s in specs], "outputs": outputs, "format": meta["mtrec.format"],
            "bytes": out.stat().st_size}


def model_inputs(model_path: str | Path) -> list[dict]:
    """The input convention recorded in an exported model's metadata."""
    path = Path(model_path)
    stat = path.stat()
    return json.loads(_metadata(str(path.resolve()), stat.st_mtime_ns, stat.st_size)["mtrec.inputs"])


@functools.lru_cache(maxsize=8)
def _metadata(path: str, mtime_ns: int, size: int) -> dict:
    """An exported model's metadata, parsed once per file version (a server calls onnx_inputs per request)."""
    props = {p.key: p.value for p in _onnx().load(path, load_external_data=False).metadata_props}
    if props.get(MARKER[0]) != MARKER[1]:
        raise UserError(f"{path} was not written by mtrec export")
    return props


def onnx_inputs(frame: pl.DataFrame, model_path: str | Path) -> dict[str, np.ndarray]:
    """The feed dict of an exported raw-input model for a raw log (docs/serving.md): per categorical
    feature its values (int64 or str, nulls as 0 / "") and ``__null``; per numeric feature float64
    with NaN for null; per list feature ``[N, W]`` values (W the longest list, at least 1), ``__len``
    and ``__null``. For a ``--codes`` model, ``frame`` is an encoded frame (what ``encode`` returns)."""
    specs = model_inputs(model_path)
    if specs and specs[0]["role"] == "codes":
        return _code_inputs(frame, model_path)
    feed = {}
    for spec in specs:
        name, feature, role = spec["name"], spec["feature"], spec["role"]
        if feature not in frame.columns:
            raise UserError(f"the log lacks column {feature!r} that the exported model takes")
        column = frame[feature]
        if len(spec["shape"]) == 2 or role == "len":
            feed[name] = _list_input(column, spec)
        elif role == "null":
            feed[name] = column.is_null().to_numpy()
        else:
            feed[name] = _flat_values(column, spec["dtype"])
    return feed


def _flat_values(column: pl.Series, dtype: str) -> np.ndarray:
    if isinstance(column.dtype, (pl.Categorical, pl.Enum)):
        column = column.cast(pl.String)
    if dtype == "float64":
        if not (column.dtype.is_numeric() or column.dtype == pl.Boolean):
            raise UserError(f"column {column.name!r} is {column.dtype}: the exported model takes numbers")
        return column.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    if dtype == "string":
        return column.cast(pl.String).fill_null("").to_numpy().astype(object)
    if not (column.dtype.is_integer() or column.dtype == pl.Boolean):
        raise UserError(f"column {column.name!r} is {column.dtype}: the exported model takes integer ids")
    return column.cast(pl.Int64).fill_null(0).to_numpy()


def _list_input(column: pl.Series, spec: dict) -> np.ndarray:
    if isinstance(column.dtype, pl.Array):
        column = column.cast(pl.List(column.dtype.inner))
    if not isinstance(column.dtype, pl.List):
        raise UserError(f"column {column.name!r} is {column.dtype}: the exported model takes a list column")
    lengths = column.list.len().fill_null(0)
    if spec["role"] == "len":
        return lengths.cast(pl.Int64).to_numpy()
    width = max(int(lengths.max() or 0), 1)
    rows = column.fill_null([])
    flat = rows.explode()
    if spec["role"] == "null":
        cells = flat.is_null().to_numpy()
        fill = np.ones((len(column), width), dtype=bool)
    else:
        cells = _flat_values(flat, spec["dtype"])
        fill = np.full((len(column), width), "" if spec["dtype"] == "string" else 0,
                       dtype=object if spec["dtype"] == "string" else np.int64)
    counts = lengths.to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(column)), counts)
    position = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    if len(cells) != len(row):  # an explode that gives one (null) row for an empty list
        present = counts > 0
        cells = cells[np.repeat(present, np.where(present, counts, 1))]
    fill[row, position] = cells
    return fill


def _code_inputs(frame: pl.DataFrame, model_path) -> dict[str, np.ndarray]:
    from mtrec.data.tensors import frame_to_split

    path = Path(model_path)
    stat = path.stat()
    columns = json.loads(_metadata(str(path.resolve()), stat.st_mtime_ns, stat.st_size)["mtrec.code_columns"])
    split = frame_to_split(frame, columns["categorical"], columns["numeric"], [])
    return {"codes": split.codes.numpy(), "numeric": split.numeric.numpy()}
