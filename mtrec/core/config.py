"""The training configuration: one dataclass, validated once, saved with the run."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtrec.core.console import err_console
from mtrec.core.errors import UserError
from mtrec.core.files import read_json_object

SCHEDULES = ("constant", "cosine", "linear")
SELECT_METRICS = ("auc", "gauc", "logloss")
EMBEDDING_SHARDINGS = ("none", "torchrec")
SHARDING_PLANS = ("auto", "table-wise", "row-wise", "column-wise")


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
    balance_groups: str = ""  # tensor or part; empty: the balancer's default (mtrec balancers shows it)
    epochs: int = 5
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant, cosine or linear decay to 0 over epochs x steps, after warmup
    warmup_steps: int = 0  # lr rises linearly from lr / warmup_steps to lr over the first steps
    clip_grad: float = 0.0  # max global norm of the applied gradients, after balancing (0: off)
    select: str = "auc"  # target-task validation metric for early stopping and best.pt: auc, gauc or logloss
    embedding_optimizer: str = "lazy-adam"  # lazy-adam, rowwise-adagrad (sparse rows) or adam (dense)
    embedding_sharding: str = "none"  # none, or torchrec: the table sharded across ranks (engine/sharded_tables.py)
    embedding_sharding_plan: str = "auto"  # auto (TorchRec's planner), table-wise, row-wise or column-wise
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    deterministic: bool = False  # deterministic kernels: bit-for-bit reruns and resume on CUDA too (slower)
    data_placement: str = "auto"  # device, host, stream, or auto (docs/design.md, "Training loop")
    shuffle_buffer: int = 1 << 20  # rows shuffled together when streaming (several row groups)
    memory_budget_gb: float = 0.0  # auto streams a train split larger than this (0: half the available memory)
    patience: int = 2  # epochs without a better target valid AUC before stopping
    embedding_dim: int = 16
    expert_sizes: list[int] = field(default_factory=lambda: [256, 128])
    tower_sizes: list[int] = field(default_factory=lambda: [64])
    num_experts: int = 4
    shared_experts: int = 1
    task_experts: int = 1
    levels: int = 1
    dropout: float = 0.0
    eval_batch_size: int = 8192  # 65,536-row batches scored at half the rows/s on CPU (cache) and cost 0.6 GiB
    ndcg_k: int = 10
    diagnostics_every: int = 200  # steps; 0 turns the gradient diagnostics log off
    checkpoint_every: int = 500  # steps; last.pt is also written at every epoch end
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops
    tensorboard: str = ""  # a directory for TensorBoard events of the logged scalars ("": none)

    def validate(self) -> TrainConfig:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive (try 1e-3)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.embedding_optimizer in ("lazy-adam", "rowwise-adagrad", "adam"),
             f"--embedding-optimizer must be lazy-adam, rowwise-adagrad or adam, not {self.embedding_optimizer!r}"),
            (self.embedding_sharding in EMBEDDING_SHARDINGS,
             f"--embedding-sharding must be none or torchrec, not {self.embedding_sharding!r}"),
            (self.embedding_sharding_plan in SHARDING_PLANS,
             f"--embedding-sharding-plan must be {', '.join(SHARDING_PLANS)}, not {self.embedding_sharding_plan!r}"),
            (self.lr_schedule in SCHEDULES, f"--lr-schedule must be {', '.join(SCHEDULES)}, not {self.lr_schedule!r}"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.clip_grad >= 0, "--clip-grad must be >= 0 (0 turns clipping off)"),
            (self.balance_groups in ("", "tensor", "part"),
             f"--balance-groups must be tensor or part, not {self.balance_groups!r}"),
            (self.select in SELECT_METRICS, f"--select must be {', '.join(SELECT_METRICS)}, not {self.select!r}"),
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
            (self.data_placement in ("auto", "device", "host", "stream"),
             "--data-placement must be auto, device, host or stream"),
            (self.shuffle_buffer >= 1, "--shuffle-buffer must be at least 1 row"),
            (self.memory_budget_gb >= 0, "--memory-budget must be >= 0 GiB (0: half the available memory)"),
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
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}")
        types = typing.get_type_hints(cls)
        return cls(**{key: _typed(key, value, types[key]) for key, value in values.items()})


def _typed(key: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the field's annotation (an int is a float; a bool is no number)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # ``X | None``: None, or a valid X
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _typed(key, value, options[0])
    if origin is list:
        if isinstance(value, list) and all(_is(v, args[0]) for v in value):
            return [float(v) if args[0] is float else v for v in value]
        wanted = f"a list of {_NAMES[args[0]][1]}"
    elif origin is dict:
        if isinstance(value, dict):
            return value
        wanted = "a table of key = value"
    else:
        if _is(value, kind):
            return float(value) if kind is float else value
        wanted = _NAMES[kind][0]
    raise UserError(f"config key {key} must be {wanted}, got {value!r} ({type(value).__name__})")


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "booleans")}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


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


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The saved ``config.json`` of a run, with ``out`` = ``run_dir`` (wherever it is now). When the
    data is no longer at its saved path but where it was relative to the run directory (both
    moved together), that path is used, with a warning."""
    run_dir = Path(run_dir)
    values = _saved_config(run_dir)
    values.pop("mtrec_version", None)
    data, saved_out = values.get("data", ""), values.get("out", "")
    if data and saved_out and not Path(data).exists():
        moved = (run_dir / os.path.relpath(data, saved_out)).resolve()
        if (moved / "schema.json").exists():
            err_console.print(f"warning: the run's data is not at {data} any more; using {moved} (where it was "
                              "relative to the run directory)", markup=False, highlight=False, soft_wrap=True)
            values["data"] = str(moved)
    values["out"] = str(run_dir.resolve())
    return values


def run_tasks(run_dir: str | Path) -> list[str]:
    """The tasks of a run, from its config.json (plot and TensorBoard export name series by them)."""
    tasks = _saved_config(Path(run_dir)).get("tasks")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise UserError(f"{Path(run_dir) / 'config.json'} is corrupt: no list of tasks: {_RESTORE}")
    return tasks


_RESTORE = "restore it from a backup, or train a new run"


def _saved_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json as saved; one line when it is not a run directory or the file is damaged."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory of mtrec train (no config.json): pass the --out of a run")
    return read_json_object(path, _RESTORE)


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
