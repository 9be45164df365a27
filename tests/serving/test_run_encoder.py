"""Issue 19.1: a run directory is self-sufficient for scoring. It keeps its vocabularies and their
fingerprint; raw logs encode with that copy whatever happens to the data folder, and an encoded
split whose encoder differs from the run's is refused in one line."""

import json
import shutil

import polars as pl
import pytest
from serving_helpers import PREPROCESS, assert_user_error, invoke, ok


def _predict(root, out):
    ok("predict", root / "run", "--raw", root / "log.parquet", "--out", out, "--device", "cpu")
    return pl.read_parquet(out)


def test_the_run_keeps_its_vocabularies_and_their_fingerprint(fresh_run):
    from mtrec.data.fingerprint import encoder_fingerprint
    from mtrec.data.schema import Schema

    root = fresh_run()
    record = json.loads((root / "run" / "encoder.json").read_text())
    schema = Schema.load(root / "data")
    assert record["fingerprint"] == encoder_fingerprint(schema, root / "data" / "vocab")
    for name in ("user_city.parquet", "item_id.parquet"):
        assert (root / "run" / "vocab" / name).read_bytes() == (root / "data" / "vocab" / name).read_bytes()


def test_predict_raw_works_after_the_data_folder_is_deleted(fresh_run, tmp_path):
    root = fresh_run()
    before = _predict(root, tmp_path / "a.parquet")
    shutil.rmtree(root / "data")
    after = _predict(root, tmp_path / "b.parquet")
    assert after.equals(before)
    code, out = invoke("evaluate", root / "run", "--raw", root / "log.parquet", "--device", "cpu", "--json")
    assert code == 0, out
    assert json.loads(out)["metrics"]["click"]["auc"] > 0.5


def test_a_re_preprocessed_data_folder_changes_neither_raw_scores_nor_passes_as_the_runs_split(fresh_run, tmp_path):
    root = fresh_run()
    before = _predict(root, tmp_path / "a.parquet")
    evaluated = json.loads(ok("evaluate", root / "run", "--raw", root / "log.parquet", "--device", "cpu", "--json"))
    # another split and seed re-codes the vocabularies (by frequency on other train rows) and the statistics
    ok("preprocess", root / "log.parquet", *PREPROCESS, "--split", "random", "--seed", 7, "--out", root / "data",
       "--force")
    assert _predict(root, tmp_path / "b.parquet").equals(before)
    again = json.loads(ok("evaluate", root / "run", "--raw", root / "log.parquet", "--device", "cpu", "--json"))
    assert again["metrics"] == evaluated["metrics"]
    code, out = invoke("evaluate", root / "run", "--split", "test", "--device", "cpu")
    assert_user_error(code, out, "preprocessed again", "--raw")
    code, out = invoke("predict", root / "run", "--raw", root / "log.parquet", "--data", root / "data",
                       "--out", tmp_path / "c.parquet", "--device", "cpu")
    assert_user_error(code, out, "preprocessed again")
    assert not (tmp_path / "c.parquet").exists()


def test_the_runs_own_split_still_scores(fresh_run):
    root = fresh_run()
    result = json.loads(ok("evaluate", root / "run", "--split", "test", "--device", "cpu", "--json"))
    assert result["metrics"]["click"]["n"] > 0


def test_a_changed_vocabulary_copy_is_refused(fresh_run, tmp_path):
    root = fresh_run()
    vocab = root / "run" / "vocab" / "user_city.parquet"
    frame = pl.read_parquet(vocab)
    vocab.unlink()  # a hard link: write a new file, not into the data folder's
    frame.reverse().write_parquet(vocab)
    code, out = invoke("predict", root / "run", "--raw", root / "log.parquet", "--out", tmp_path / "p.parquet",
                       "--device", "cpu")
    assert_user_error(code, out, "fingerprint")


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"other": 1}'])
def test_a_damaged_encoder_json_is_one_line(fresh_run, tmp_path, damage):
    root = fresh_run()
    (root / "run" / "encoder.json").write_text(damage)
    code, out = invoke("predict", root / "run", "--raw", root / "log.parquet", "--out", tmp_path / "p.parquet",
                       "--device", "cpu")
    assert_user_error(code, out, "encoder.json")
    assert "train again" in out and not (tmp_path / "p.parquet").exists()


def test_an_older_run_without_the_copy_encodes_with_its_data_folder(fresh_run, tmp_path):
    root = fresh_run()
    before = _predict(root, tmp_path / "a.parquet")
    shutil.rmtree(root / "run" / "vocab")
    (root / "run" / "encoder.json").unlink()
    assert _predict(root, tmp_path / "b.parquet").equals(before)
    shutil.rmtree(root / "data")
    code, out = invoke("predict", root / "run", "--raw", root / "log.parquet", "--out", tmp_path / "c.parquet",
                       "--device", "cpu")
    assert_user_error(code, out, "--data")


@pytest.mark.parametrize("keep, needle", [("p_click", "collide"), ("user_id,user_id", "more than once")])
def test_predict_keep_mistakes_are_one_line(fresh_run, tmp_path, keep, needle):
    """Issue 19.7: a --keep column named like an output, or repeated, is a user error, not a traceback."""
    root = fresh_run()
    log = tmp_path / "log.parquet"
    pl.read_parquet(root / "log.parquet").with_columns(pl.col("click").alias("p_click")).write_parquet(log)
    code, out = invoke("predict", root / "run", "--raw", log, "--out", tmp_path / "p.parquet", "--keep", keep,
                       "--device", "cpu")
    assert_user_error(code, out, needle)
    assert not (tmp_path / "p.parquet").exists()


def test_predict_keeps_a_column_that_is_both_the_user_and_the_item_once(tmp_path):
    """One column given as --user and --item at preprocess: predict's default --keep names it once
    (it named it twice, a Polars traceback; found by tests/fuzz)."""
    from serving_helpers import TINY

    ok("synth", "--rows", 1500, "--seed", 3, "--out", tmp_path / "log.parquet")
    ok("preprocess", tmp_path / "log.parquet", "--labels", "click,like,share", "--user", "user_id", "--item",
       "user_id", "--time", "ts", "--out", tmp_path / "data")
    ok("train", tmp_path / "data", "--model", "shared-bottom", "--target", "click", *TINY, "--out", tmp_path / "run")
    preds = _predict(tmp_path, tmp_path / "p.parquet")
    log = pl.read_parquet(tmp_path / "log.parquet")
    assert preds.columns == ["user_id", "p_click", "p_like", "p_share"]
    assert preds["user_id"].equals(log["user_id"])
