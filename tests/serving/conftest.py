"""Small trained runs for the serving tests: each test that changes its data folder gets its own."""

from pathlib import Path

import pytest
from serving_helpers import PREPROCESS, TINY, ok


@pytest.fixture
def fresh_run(tmp_path_factory):
    """``make(model="shared-bottom", *train_flags) -> root``: root/log.parquet (2,000 synthetic rows),
    root/data (preprocessed, time split) and root/run (one epoch), owned by one test."""
    def make(model: str = "shared-bottom", *flags, rows: int = 2000, history: int = 0, spec: Path | None = None):
        root = tmp_path_factory.mktemp("serve")
        ok("synth", "--rows", rows, "--seed", 3, "--history", history, "--out", root / "log.parquet")
        ok("preprocess", root / "log.parquet", *PREPROCESS, *(["--spec", spec] if spec else []),
           "--out", root / "data")
        ok("train", root / "data", "--model", model, "--target", "click", *TINY, *flags, "--out", root / "run")
        return root

    return make
