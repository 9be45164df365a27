"""Fixtures shared across the test packages."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def encoded_synthetic(tmp_path_factory):
    """``make(name, rows, seed) -> root``: a synthetic log at ``root/log.parquet`` encoded by
    ``preprocess`` (time split, user/item known) into ``root/data``."""
    from mtrec.data.preprocess import preprocess
    from mtrec.data.synth import write_synthetic

    def make(name: str, rows: int, seed: int) -> Path:
        root = tmp_path_factory.mktemp(name)
        write_synthetic(root / "log.parquet", rows=rows, seed=seed)
        preprocess([str(root / "log.parquet")], ["click", "like", "share"], str(root / "data"), user="user_id",
                   item="item_id", time="ts")
        return root

    return make
