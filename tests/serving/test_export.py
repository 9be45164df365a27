"""Issue 22: ``mtrec export`` writes one ONNX graph, raw columns in, probabilities out. For every
architecture (with list features, a conditional task, ESMM) ONNX Runtime on a raw log gives what
``mtrec predict`` writes for it, to 1e-5, with unseen values, nulls, NaN / inf numbers, empty, null
and over-long lists; a graph from a run whose data folder is gone works; hashed features are refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from serving_helpers import PREPROCESS, TINY, assert_user_error, invoke, ok

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SPEC = Path(__file__).resolve().parents[2] / "sample_data" / "sequence_spec.toml"  # attention + mean pooling
MODELS = {
    "single": ["--model", "single"],
    "shared-bottom": ["--model", "shared-bottom", "--condition", "like:click"],
    "mmoe": ["--model", "mmoe"],
    "ple": ["--model", "ple", "--levels", "2"],
    "esmm": ["--model", "esmm", "--tasks", "share,click", "--condition", "share:click"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ok("synth", "--rows", 2000, "--seed", 5, "--history", 8, "--out", root / "log.parquet")
    ok("preprocess", root / "log.parquet", *PREPROCESS, "--spec", SPEC, "--out", root / "data")
    return root


@pytest.fixture(scope="module")
def runs(world):
    made = {}

    def get(name):
        if name not in made:
            ok("train", world / "data", "--target", "click", *TINY, *MODELS[name], "--out", world / f"run-{name}")
            made[name] = world / f"run-{name}"
        return made[name]

    return get


def _awkward_log(world, path):
    """The first 400 rows, with every case encode has a rule for."""
    log = pl.read_parquet(world / "log.parquet").head(400)
    i = pl.int_range(pl.len())
    hist = pl.col("hist_items")
    log = log.with_columns(
        pl.when(i % 7 == 1).then(pl.lit("a city never seen")).when(i % 7 == 2).then(None)
          .otherwise(pl.col("user_city")).alias("user_city"),
        pl.when(i % 5 == 1).then(10**12).when(i % 5 == 2).then(None).otherwise(pl.col("item_id")).alias("item_id"),
        pl.when(i % 6 == 1).then(float("nan")).when(i % 6 == 2).then(None).when(i % 6 == 3).then(float("inf"))
          .when(i % 6 == 4).then(-3.5e6).otherwise(pl.col("item_price")).alias("item_price"),
        pl.when(i % 4 == 1).then(pl.lit([], dtype=pl.List(pl.Int64))).when(i % 4 == 2).then(None)
          .when(i % 4 == 3).then(hist.list.concat(hist).list.concat(hist).list.concat(pl.lit([10**12, None])))
          .otherwise(hist).alias("hist_items"),  # empty, null, over 20 long with an unseen and a null element
        pl.when(i % 3 == 1).then(pl.lit(["t_unseen", None, "tag_1", "tag_2", "tag_3", "tag_4", "tag_5"]))
          .when(i % 3 == 2).then(pl.lit([], dtype=pl.List(pl.String))).otherwise(pl.col("tags")).alias("tags"),
    )
    log.write_parquet(path)
    return log


def _ort(model_path, feed):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(session.get_outputs(), session.run(None, feed))}


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_on_a_raw_log_equals_mtrec_predict(world, runs, tmp_path, name):
    from mtrec.serving.export import onnx_inputs

    run = runs(name)
    log = _awkward_log(world, tmp_path / "log.parquet")
    ok("export", run, "--out", tmp_path / "model.onnx")
    ok("predict", run, "--raw", tmp_path / "log.parquet", "--out", tmp_path / "p.parquet", "--device", "cpu")
    expected = pl.read_parquet(tmp_path / "p.parquet")
    got = _ort(tmp_path / "model.onnx", onnx_inputs(log, tmp_path / "model.onnx"))
    names = [c for c in expected.columns if c.startswith("p_")]
    assert sorted(got) == sorted(names)
    assert ("p_ctcvr" in got) == (name == "esmm")
    for column in names:
        np.testing.assert_allclose(got[column], expected[column].to_numpy(), rtol=0, atol=1e-5, err_msg=column)
    # and one row at a time (batch 1) gives the same
    one = _ort(tmp_path / "model.onnx", onnx_inputs(log.slice(3, 1), tmp_path / "model.onnx"))
    assert one[names[0]][0] == pytest.approx(expected[names[0]][3], abs=1e-5)


def test_the_graph_encodes_exactly_as_encode(world, runs, tmp_path):
    """The encoding subgraph alone (its codes and numbers, not only the probabilities) equals encode."""
    import onnx

    from mtrec.data.encode import encode
    from mtrec.data.schema import Schema
    from mtrec.data.tensors import frame_to_split
    from mtrec.engine.build import feature_names
    from mtrec.serving.export import onnx_inputs

    run = runs("mmoe")
    log = _awkward_log(world, tmp_path / "log.parquet")
    ok("export", run, "--out", tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    model.graph.output.extend([onnx.helper.make_tensor_value_info("codes", onnx.TensorProto.INT32, None),
                               onnx.helper.make_tensor_value_info("numeric", onnx.TensorProto.FLOAT, None)])
    onnx.save(model, str(tmp_path / "probe.onnx"))
    got = _ort(tmp_path / "probe.onnx", onnx_inputs(log, tmp_path / "model.onnx"))
    schema = Schema.load(run)
    expected = frame_to_split(encode(log, schema, run / "vocab", labels=[]), *feature_names(schema), [])
    np.testing.assert_array_equal(got["codes"], expected.codes.numpy())
    np.testing.assert_array_equal(got["numeric"], expected.numeric.numpy())
    assert (expected.codes.numpy() == 1).any() and (expected.codes.numpy() == 0).any()  # OOV and null happened


def test_a_graph_exported_after_the_data_folder_is_deleted_works(world, tmp_path):
    from mtrec.serving.export import onnx_inputs

    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    ok("train", data, "--target", "click", *TINY, "--model", "shared-bottom", "--out", tmp_path / "run")
    shutil.rmtree(data)
    log = _awkward_log(world, tmp_path / "log.parquet")
    ok("export", tmp_path / "run", "--out", tmp_path / "model.onnx")
    ok("predict", tmp_path / "run", "--raw", tmp_path / "log.parquet", "--out", tmp_path / "p.parquet",
       "--device", "cpu")
    got = _ort(tmp_path / "model.onnx", onnx_inputs(log, tmp_path / "model.onnx"))
    np.testing.assert_allclose(got["p_click"], pl.read_parquet(tmp_path / "p.parquet")["p_click"].to_numpy(),
                               atol=1e-5, rtol=0)


def test_metadata_names_the_inputs_tasks_and_fingerprint(runs, tmp_path):
    import onnx

    run = runs("esmm")
    ok("export", run, "--out", tmp_path / "model.onnx", "--checkpoint", "last")
    model = onnx.load(str(tmp_path / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["mtrec.fingerprint"] == json.loads((run / "encoder.json").read_text())["fingerprint"]
    assert json.loads(props["mtrec.tasks"]) == ["click", "share"]  # the target first
    assert json.loads(props["mtrec.outputs"]) == ["p_click", "p_share", "p_ctcvr"]
    assert props["mtrec.checkpoint"] == "last"
    inputs = {i["name"]: i for i in json.loads(props["mtrec.inputs"])}
    assert [i.name for i in model.graph.input] == list(inputs)
    assert inputs["user_city"]["dtype"] == "string" and inputs["user_city__null"]["dtype"] == "bool"
    assert inputs["item_price"]["dtype"] == "float64" and "item_price__null" not in inputs
    assert inputs["hist_items"]["shape"] == ["N", "W_hist_items"] and inputs["hist_items__len"]["dtype"] == "int64"


def test_codes_export_is_the_network_on_encoded_codes(world, runs, tmp_path):
    from mtrec.data.encode import encode
    from mtrec.data.schema import Schema
    from mtrec.serving.export import onnx_inputs

    run = runs("ple")
    log = _awkward_log(world, tmp_path / "log.parquet")
    ok("export", run, "--out", tmp_path / "codes.onnx", "--codes")
    ok("predict", run, "--raw", tmp_path / "log.parquet", "--out", tmp_path / "p.parquet", "--device", "cpu")
    encoded = encode(log, Schema.load(run), run / "vocab", labels=[])
    got = _ort(tmp_path / "codes.onnx", onnx_inputs(encoded, tmp_path / "codes.onnx"))
    expected = pl.read_parquet(tmp_path / "p.parquet")
    for column in ("p_click", "p_like", "p_share"):
        np.testing.assert_allclose(got[column], expected[column].to_numpy(), atol=1e-5, rtol=0)


def test_a_hashed_feature_is_refused_naming_it(world, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[features.user_city]\nhash_buckets = 50\n')
    ok("preprocess", world / "log.parquet", *PREPROCESS, "--exclude", "hist_items,tags", "--spec", spec,
       "--out", tmp_path / "data")
    ok("train", tmp_path / "data", "--target", "click", *TINY, "--model", "shared-bottom", "--out", tmp_path / "run")
    code, out = invoke("export", tmp_path / "run", "--out", tmp_path / "m.onnx")
    assert_user_error(code, out, "user_city", "hash", "--codes")
    assert not (tmp_path / "m.onnx").exists()
    ok("export", tmp_path / "run", "--out", tmp_path / "m.onnx", "--codes")  # the network alone still exports


def test_force_replaces_only_an_export(runs, tmp_path):
    run = runs("mmoe")
    foreign = tmp_path / "other.onnx"
    foreign.write_bytes(b"not ours")
    assert_user_error(*invoke("export", run, "--out", foreign), "--force")
    assert_user_error(*invoke("export", run, "--out", foreign, "--force"), "not a model written by mtrec export")
    assert foreign.read_bytes() == b"not ours"
    ok("export", run, "--out", tmp_path / "m.onnx")
    ok("export", run, "--out", tmp_path / "m.onnx", "--force", "--checkpoint", "last")
    assert_user_error(*invoke("export", run, "--out", tmp_path / "x.onnx", "--format", "tflite"), "--format")


def test_without_onnx_the_error_is_one_line(runs, tmp_path, monkeypatch):
    import sys

    run = runs("mmoe")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert_user_error(*invoke("export", run, "--out", tmp_path / "m.onnx"), "mtrec[export]")
