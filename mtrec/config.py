"""The training configuration: one dataclass, validated once, saved with the run."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtrec.errors import UserError


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: str = "mmoe"
    target: str = ""
    tasks: list[str] = field(default_factory=list)  # empty: every label; the target always first
    conditions: list[str] = field(default_factory=list)  # "task:given": task trained/scored where given = 1
    balancer: str = "ew"
    balancer_opts: dict[str, Any] = field(default_factory=dict)
    scope: str = ""  # empty: the balancer's default scope
    epochs: int = 5
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    embedding_optimizer: str = "lazy-adam"  # lazy-adam, rowwise-adagrad (sparse rows) or adam (dense)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    data_placement: str = "auto"  # device, host, or auto: device when the split takes <= 50% of free memory
    patience: int = 2  # epochs without a better target valid AUC before stopping
    embedding_dim: int = 16
    expert_sizes: list[int] = field(default_factory=lambda: [256, 128])
    tower_sizes: list[int] = field(default_factory=lambda: [64])
    num_experts: int = 4
    shared_experts: int = 1
    task_experts: int = 1
    levels: int = 1
    dropout: float = 0.0
    eval_batch_size: int = 65536
    ndcg_k: int = 10
    diagnostics_every: int = 200  # steps; 0 turns the gradient diagnostics log off
    checkpoint_every: int = 500  # steps; last.pt is also written at every epoch end
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops

    def validate(self) -> "TrainConfig":
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive (try 1e-3)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.embedding_optimizer in ("lazy-adam", "rowwise-adagrad", "adam"),
             f"--embedding-optimizer must be lazy-adam, rowwise-adagrad or adam, not {self.embedding_optimizer!r}"),
            (self.patience >= 1, "--patience must be at least 1"),
            (self.embedding_dim >= 1, "--embedding-dim must be at least 1"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.num_experts >= 1 and self.shared_experts >= 1 and self.task_experts >= 1,
             "expert counts must be at least 1"),
            (self.levels >= 1, "--levels must be at least 1 (1 = CGC)"),
            (all(s >= 1 for s in self.expert_sizes + self.tower_sizes), "layer sizes must be positive"),
            (len(self.expert_sizes) >= 1, "expert_sizes needs at least one layer"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, not {self.device!r}"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.data_placement in ("auto", "device", "host"), "--data-placement must be auto, device or host"),
            (self.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
            (self.eval_batch_size >= 1 and self.ndcg_k >= 1, "eval_batch_size and ndcg_k must be positive"),
            (self.diagnostics_every >= 0 and self.checkpoint_every >= 0,
             "diagnostics_every and checkpoint_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}")
        return cls(**values)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config; ``data`` and ``out`` paths in it are relative to the file itself."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from err
    for key in ("data", "out"):
        if key in values and not Path(values[key]).is_absolute():
            values[key] = str((path.parent / values[key]).resolve())
    return values


def parse_opt(text: str) -> tuple[str, Any]:
    """``key=value`` with value read as a TOML literal (number, list, bool), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--balancer-opt expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
