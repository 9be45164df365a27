"""Issue 19.9: ``evaluate --raw`` encodes and scores the log chunk by chunk, as predict does: no
chunk of encoded features larger than ``chunk_rows`` exists, and the metrics over the whole log are
those of the whole log at once."""

import polars as pl
import pytest


def test_raw_evaluation_in_chunks_equals_the_whole_log_at_once(fresh_run, monkeypatch):
    import mtrec.serving.evaluate as evaluate
    from mtrec.data.encode import encode
    from mtrec.data.schema import Schema
    from mtrec.data.tensors import frame_to_split
    from mtrec.engine.build import feature_names, objective_for
    from mtrec.metrics.split import split_metrics

    root = fresh_run()
    heights = []

    def recording(frame, *args):
        heights.append(frame.height)
        return frame_to_split(frame, *args)

    monkeypatch.setattr(evaluate, "frame_to_split", recording)
    chunked = evaluate.evaluate_run(root / "run", raw=str(root / "log.parquet"), device="cpu", chunk_rows=300)
    assert max(heights) <= 300 and sum(heights) == 2000 and len(heights) >= 7

    model, cfg, tasks, _ = evaluate.load_run(root / "run")
    schema = Schema.load(root / "run")
    whole = encode(pl.read_parquet(root / "log.parquet"), schema, root / "run" / "vocab")
    expected = split_metrics(model, frame_to_split(whole, *feature_names(schema), tasks), objective_for(cfg, tasks),
                             4096, cfg.ndcg_k)
    for task in tasks:
        for key in ("auc", "gauc", "logloss", "ndcg", "n"):
            assert chunked["metrics"][task][key] == pytest.approx(expected[task][key], rel=1e-9), (task, key)
