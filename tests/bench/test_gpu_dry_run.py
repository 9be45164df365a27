"""bench/gpu.sh, the one prepared device run (issue 18), end to end in its dry mode (device cpu,
tiny sizes): a typo, a missing file or a wrong flag fails here, not on a lent GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_run_script_runs_dry_and_writes_every_result(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "GPU_DRY": "1", "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = ("tests", "checks", "speed_mmoe", "speed_balancers", "speed_metrics", "speed_arch", "suite")
    expected = {"device.txt", "matrix.json", "agree.json", "syncs.json", "speed_arch.json", "speed_mmoe.json",
                "speed_balancers.json", *(f"{name}.txt" for name in steps)}
    assert expected <= {p.name for p in out.iterdir()}
    for name in (f"{name}.txt" for name in steps):
        first = (out / name).read_text().splitlines()[0]
        assert first.startswith("# device: cpu; torch ") and "command: " in first, (name, first)
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["torch"] and matrix["command"] and matrix["device"] == "cpu"
    cases = matrix["cases"]
    assert all(c["ok"] for c in cases), [c for c in cases if not c["ok"]]
    trained = {(c["model"], c["balancer"]) for c in cases if c["scope"] != "evaluate+predict"}
    assert trained == {(m, b) for m in ("shared-bottom", "mmoe", "ple", "esmm")
                       for b in ("ew", "metabalance", "gradcraft", "pcgrad")}
    # every scope a gradient balancer allows, and evaluate + predict per architecture
    assert {c["scope"] for c in cases if c["balancer"] == "pcgrad"} == {"shared", "all", "representation"}
    assert sum(c["scope"] == "evaluate+predict" and c["predicted_rows"] > 0 for c in cases) == 4
    agree = json.loads((out / "agree.json").read_text())["cases"]
    assert len(agree) == 6 and all(c["ok"] for c in agree)
    speed = json.loads((out / "speed_balancers.json").read_text())
    assert {row["balancer"] for row in speed["results"]} == {"ew", "metabalance", "gradcraft", "pcgrad"}
    # the network (26 fields on the device; torch.compile there only) and the loop's three feeds
    mmoe = json.loads((out / "speed_mmoe.json").read_text())
    assert mmoe["fields"] == 14 and [r["compiled"] for r in mmoe["results"]] == [False]
    assert [r["placement"] for r in mmoe["placements"]] == ["device", "host", "stream"]
    assert all(r["samples_per_s"] > 0 for r in mmoe["results"] + mmoe["placements"])
