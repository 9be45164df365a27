"""``--json`` output is strict JSON: an undefined metric (NaN) is null, never the bare ``NaN``."""

import json
import math

from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.core.files import strict_json


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_strict_json_turns_non_finite_floats_into_null_at_any_depth():
    value = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf, "d": (0.25, math.nan)}], "e": "NaN", "f": 3}
    assert strict_loads(strict_json(value)) == {"a": None, "b": [1.5, None, {"c": None, "d": [0.25, None]}],
                                                "e": "NaN", "f": 3}
    assert "NaN" not in strict_json({"x": math.nan}) and "Infinity" not in strict_json([math.inf])


def test_evaluate_json_prints_an_undefined_metric_as_null(monkeypatch):
    import mtrec.serving.evaluate

    result = {"data": "d", "target": "click", "ndcg_k": 10,
              "metrics": {"click": {"auc": 0.75, "gauc": math.nan, "logloss": 0.3, "n": 4}}}
    monkeypatch.setattr(mtrec.serving.evaluate, "evaluate_run", lambda *a, **k: result)
    done = CliRunner().invoke(app, ["evaluate", "some-run", "--json"])
    assert done.exit_code == 0, done.output
    assert strict_loads(done.output)["metrics"]["click"] == {"auc": 0.75, "gauc": None, "logloss": 0.3, "n": 4}
