"""Checkpoints load without running code, survive truncation clearly, and are written atomically."""

import os
import pickle

import pytest
import torch

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write
from mtrec.engine import checkpoint


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": torch.get_rng_state(), "n": [1, 2.5]}
    checkpoint.save(tmp_path / "c.pt", state, {"epoch": 3, "tasks": ["a", "b"]})
    loaded, meta = checkpoint.load(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["rng"], state["rng"])
    assert meta == {"epoch": 3, "tasks": ["a", "b"]}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_crafted_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state": {"x": _RunsCode()}, "meta": "{}"}, path)
    with pytest.raises(UserError, match="refused"):
        checkpoint.load(path)
    assert not (tmp_path / "PWNED").exists()
    # A raw pickle (not a torch zip) is refused too, and nothing runs.
    with open(tmp_path / "evil2.pt", "wb") as fh:
        pickle.dump(_RunsCode(), fh)
    with pytest.raises(UserError):
        checkpoint.load(tmp_path / "evil2.pt")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    checkpoint.save(tmp_path / "c.pt", {"w": torch.randn(1000)}, {})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "c.pt")


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path):
    checkpoint.save(tmp_path / "c.pt", {"w": torch.ones(3)}, {"v": 1})

    def boom(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "c.pt", boom)
    state, meta = checkpoint.load(tmp_path / "c.pt")
    assert meta == {"v": 1} and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
