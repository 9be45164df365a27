"""The feature-encoding subgraph of an exported run: raw columns in, the model's codes and numbers out.

It applies exactly the rules of ``mtrec.data.encode`` with standard ONNX ops and the ai.onnx.ml
``LabelEncoder`` (opset 2), the vocabularies stored in the graph as its keys:

- a categorical value: its vocabulary code, an unseen value 1 (OOV), a null 0 (PAD);
- a quantile-bucketized value: 2 + the number of boundaries below it, a null or non-finite 0;
- a numeric value: non-finite -> null, ``sign(x) * log(1 + |x|)`` when the feature has log1p,
  null -> the fill, ``(v - mean) / std`` in float64, then float32;
- a list: element codes as above, its last ``max_len`` elements left-aligned, padded with 0.

Input convention (docs/serving.md): a categorical feature is ``<name>`` (int64 or string, ``[N]``)
with ``<name>__null`` (bool ``[N]``); a numeric or bucketized feature is ``<name>`` (float64 ``[N]``,
NaN for null); a list feature is ``<name>`` (``[N, W]``, each row's elements first, then anything),
``<name>__len`` (int64 ``[N]``, 0 for a null list) and ``<name>__null`` (bool ``[N, W]``, a null
element). Hashed features are refused: the standard ops cannot reproduce mtrec's string hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mtrec.core.errors import UserError
from mtrec.data.encode import OOV, PAD, _transform_scalar, vocab_path
from mtrec.data.schema import Feature, Schema

ML_DOMAIN = "ai.onnx.ml"
_P = "mtrec_encode/"


@dataclass
class InputSpec:
    """One graph input: name, ONNX element type name, shape, and what it carries."""

    name: str
    dtype: str  # "int64" | "string" | "float64" | "bool"
    shape: list[str]
    feature: str
    role: str  # "value" | "null" | "len"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape, "feature": self.feature,
                "role": self.role}


@dataclass
class EncodingGraph:
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    inputs: list[InputSpec] = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{_P}{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def exportable(schema: Schema) -> None:
    """Refuse, naming it, the first feature whose encoding the standard ops cannot reproduce exactly."""
    for f in schema.features:
        source = schema.feature(f.share_with) if f.kind == "sequence" and f.share_with else f
        if source.hash_buckets:
            raise UserError(f"feature {f.name!r} is hashed into {source.hash_buckets:,} buckets: ONNX's standard ops "
                            "cannot reproduce mtrec's hash exactly, so it is not exported; export the network on "
                            "codes with mtrec export --codes and encode with mtrec")


def _vocabulary(feature: Feature, vocab_dir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(input dtype, keys, codes) of a feature's vocabulary file."""
    path = vocab_path(vocab_dir, feature.name)
    if not path.is_file():
        raise UserError(f"vocabulary {path} is missing: the run directory is incomplete, train again")
    vocab = pl.read_parquet(path, columns=["value", "code"])
    dtype = vocab["value"].dtype
    codes = vocab["code"].cast(pl.Int64).to_numpy()
    if dtype == pl.String:
        return "string", vocab["value"].to_numpy().astype(object), codes
    if dtype.is_integer() or dtype == pl.Boolean:
        values = vocab["value"].cast(pl.Int64, strict=False)
        if values.null_count() == 0:
            return "int64", values.to_numpy(), codes
    raise UserError(f"feature {feature.name!r} has a {dtype} vocabulary: only string and integer vocabularies are "
                    "exported exactly; export the network on codes with mtrec export --codes")


def _lookup(g: EncodingGraph, values: str, dtype: str, keys: np.ndarray, codes: np.ndarray) -> str:
    """int64 codes of ``values`` (any shape) through a LabelEncoder; unseen -> OOV."""
    if len(keys) == 0:  # an empty vocabulary: every value is unseen (a key that maps to OOV)
        keys, codes = (np.array([""], dtype=object) if dtype == "string" else np.zeros(1, np.int64)), np.array([OOV])
    key_attr = {"keys_strings": [str(k) for k in keys]} if dtype == "string" else {"keys_int64s": keys.tolist()}
    return g.op("LabelEncoder", [values], "vocab", domain=ML_DOMAIN, values_int64s=codes.tolist(),
                default_int64=OOV, **key_attr)


def _where_null(g: EncodingGraph, null: str, code: str) -> str:
    return g.op("Where", [null, g.const("pad", np.array(PAD, np.int64)), code], "code")


def _finite(g: EncodingGraph, x: str) -> str:
    bad = g.op("Or", [g.op("IsNaN", [x]), g.op("IsInf", [x])])
    return g.op("Not", [bad], "finite")


def _categorical(g: EncodingGraph, f: Feature, vocab_dir: Path) -> str:
    """``[N, 1]`` int64 codes of a flat categorical feature."""
    if f.bucketize:
        g.inputs.append(InputSpec(f.name, "float64", ["N"], f.name, "value"))
        x = f.name
        bounds = g.const("bounds", np.asarray(f.boundaries or [], np.float64).reshape(1, -1))
        below = g.op("Cast", [g.op("Less", [bounds, g.op("Unsqueeze", [x, g.const("ax", np.array([1]))])])],
                     to=7)  # int64
        count = g.op("ReduceSum", [below, g.const("ax", np.array([1]))], keepdims=0)
        code = g.op("Where", [_finite(g, x), g.op("Add", [count, g.const("two", np.array(2, np.int64))]),
                              g.const("pad", np.array(PAD, np.int64))], "code")
    else:
        dtype, keys, codes = _vocabulary(f, vocab_dir)
        g.inputs += [InputSpec(f.name, dtype, ["N"], f.name, "value"),
                     InputSpec(f"{f.name}__null", "bool", ["N"], f.name, "null")]
        code = _where_null(g, f"{f.name}__null", _lookup(g, f.name, dtype, keys, codes))
    return g.op("Unsqueeze", [code, g.const("ax", np.array([1]))])


def _sequence(g: EncodingGraph, f: Feature, schema: Schema, vocab_dir: Path) -> str:
    """``[N, max_len]`` int64 codes: the last max_len elements, left-aligned, 0-padded."""
    source = schema.feature(f.share_with) if f.share_with else f
    dtype, keys, codes = _vocabulary(source, vocab_dir)
    values, lengths, nulls = f.name, f"{f.name}__len", f"{f.name}__null"
    width_name = f"W_{f.name}"  # each list its own padded width
    g.inputs += [InputSpec(values, dtype, ["N", width_name], f.name, "value"),
                 InputSpec(lengths, "int64", ["N"], f.name, "len"),
                 InputSpec(nulls, "bool", ["N", width_name], f.name, "null")]
    every = _where_null(g, nulls, _lookup(g, values, dtype, keys, codes))  # [N, W]
    width = f.max_len
    limit = g.const("max_len", np.array(width, np.int64))
    zero, one = g.const("zero", np.array(0, np.int64)), g.const("one", np.array(1, np.int64))
    start = g.op("Max", [g.op("Sub", [lengths, limit]), zero], "start")  # [N]
    kept = g.op("Min", [lengths, limit], "kept")  # [N]
    positions = g.const("positions", np.arange(width, dtype=np.int64).reshape(1, width))  # [1, L]
    ax = g.const("ax", np.array([1]))
    index = g.op("Add", [g.op("Unsqueeze", [start, ax]), positions], "index")  # [N, L]
    last = g.op("Sub", [g.op("Gather", [g.op("Shape", [every]), one], axis=0), one], "last")  # W - 1
    index = g.op("Min", [index, last])
    gathered = g.op("GatherElements", [every, index], axis=1)
    valid = g.op("Less", [positions, g.op("Unsqueeze", [kept, ax])], "valid")
    return g.op("Where", [valid, gathered, g.const("pad", np.array(PAD, np.int64))], "codes")


def _numeric(g: EncodingGraph, f: Feature) -> str:
    """``[N, 1]`` float32 standardised value."""
    g.inputs.append(InputSpec(f.name, "float64", ["N"], f.name, "value"))
    x = f.name
    value = x
    if f.log1p:
        magnitude = g.op("Log", [g.op("Add", [g.op("Abs", [x]), g.const("one", np.array(1.0))])])
        value = g.op("Mul", [g.op("Sign", [x]), magnitude], "log1p")
    fill = f.mean if f.fill is None else _transform_scalar(f.fill, f.log1p)
    value = g.op("Where", [_finite(g, x), value, g.const("fill", np.array(fill, np.float64))], "filled")
    value = g.op("Div", [g.op("Sub", [value, g.const("mean", np.array(f.mean, np.float64))]),
                         g.const("std", np.array(f.std, np.float64))], "standard")
    value = g.op("Cast", [value], to=1)  # float32
    return g.op("Unsqueeze", [value, g.const("ax", np.array([1]))])


def encoding_graph(schema: Schema, vocab_dir: str | Path, codes: str = "codes",
                   numeric: str = "numeric") -> EncodingGraph:
    """Nodes that compute ``codes`` (int32 ``[N, F + sum(max_len)]``, model order) and ``numeric``
    (float32 ``[N, F_num]``) from the raw inputs, which ``.inputs`` lists in schema order."""
    from onnx import TensorProto, helper

    exportable(schema)
    vocab_dir = Path(vocab_dir)
    g = EncodingGraph()
    parts = {}
    for f in schema.features:
        if f.kind == "numeric":
            parts[f.name] = _numeric(g, f)
        elif f.kind == "sequence":
            parts[f.name] = _sequence(g, f, schema, vocab_dir)
        else:
            parts[f.name] = _categorical(g, f, vocab_dir)
    code_parts = [parts[f.name] for f in schema.categorical_features + schema.sequence_features]
    if not code_parts:
        raise UserError("the run has no categorical feature: nothing to export")
    joined = g.op("Concat", code_parts, axis=1) if len(code_parts) > 1 else code_parts[0]
    g.nodes.append(helper.make_node("Cast", [joined], [codes], name=_P + "codes", to=TensorProto.INT32))
    numeric_parts = [parts[f.name] for f in schema.numeric_features]
    if numeric_parts:
        g.nodes.append(helper.make_node("Concat", numeric_parts, [numeric], name=_P + "numeric", axis=1))
    else:  # [N, 0]
        rows = g.op("Slice", [g.op("Shape", [joined]), g.const("s", np.array([0])), g.const("e", np.array([1]))])
        shape = g.op("Concat", [rows, g.const("zero", np.array([0], np.int64))], axis=0)
        g.nodes.append(helper.make_node("ConstantOfShape", [shape], [numeric], name=_P + "numeric",
                                        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])))
    return g
