"""Building a run from its configuration: ``build_run(cfg)`` returns one ``Run`` holding the
device (and torchrun group), the tasks and their objective, the model, balancer, scope and groups,
the optimizer, the precision and where the data lives, checked once, before the first step. The
pieces (``build_for``, ``feature_names``, ``objective_for`` ...) are what ``evaluate`` and
``predict`` need too, so none of them imports another."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mtrec import balancers
from mtrec.balancers.base import Balancer
from mtrec.core.config import TrainConfig
from mtrec.core.errors import UserError
from mtrec.data.schema import Schema
from mtrec.data.stream import ParquetSplit, available_memory
from mtrec.data.tensors import fits_on_device
from mtrec.engine import distributed, sharded_tables
from mtrec.engine.objective import Objective, parse_conditions
from mtrec.engine.optim import CombinedOptimizer, build_optimizer
from mtrec.engine.step import SCOPES, Stepper
from mtrec.models import ModelConfig, SequenceField, SingleTask
from mtrec.models import build as build_model


@dataclass
class Run:
    """Everything a training run needs, built from its config. ``cfg`` is the resolved config (task
    order, scope and groups filled in): one source of truth for config.json and every checkpoint."""

    cfg: TrainConfig
    schema: Schema
    tasks: list[str]
    objective: Objective
    device: torch.device
    group: distributed.Group | None  # the torchrun process group, None in one process
    model: torch.nn.Module
    balancer: Balancer
    optimizer: object
    autocast_dtype: torch.dtype | None
    placement: str  # device, host or stream: where the train and valid splits live
    tables: sharded_tables.ShardedTables | None = None  # --embedding-sharding torchrec: model.embedding

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and prints (rank 0, or the only one)."""
        return self.group is None or self.group.main

    def stepper(self) -> Stepper:
        cfg = self.cfg
        kind = sharded_tables.ShardedStepper if self.tables is not None else Stepper
        return kind(self.model, self.balancer, self.optimizer, cfg.scope, self.device, self.autocast_dtype,
                       self.objective, clip_grad=cfg.clip_grad, groups=cfg.balance_groups, group=self.group)


def build_run(cfg: TrainConfig) -> Run:
    """Check the config (validated, absolute paths: ``resolved_paths``) against the data, then build
    the run: device, tasks, model (seeded), balancer and its scope, data placement, optimizer."""
    schema = Schema.load(cfg.data)
    tasks = resolve_tasks(schema, cfg.target, cfg.tasks)
    check_task_settings(cfg, schema, tasks)
    device, group = run_device(cfg)
    if cfg.deterministic:
        use_deterministic_kernels()
    torch.manual_seed(cfg.seed)
    model, balancer = build_for(cfg, schema, tasks)
    scope = balance_scope(cfg, model, balancer, group)
    groups = cfg.balance_groups or getattr(balancer, "default_groups", None) or "tensor"
    model.to(device)
    balancer.to(device)
    tables = None
    if cfg.embedding_sharding == "torchrec":
        sharded_tables.check(cfg, model, balancer, scope)
        tables = sharded_tables.shard(model, cfg, device)
    categorical, numeric = feature_names(schema)
    placement = data_placement(cfg, ParquetSplit(Path(cfg.data) / "train.parquet", categorical, numeric, tasks),
                               device)
    if group:  # decided by rank 0 from its memory: every rank must walk the same global batches
        placement = group.agree(placement)
    return Run(dataclasses.replace(cfg, tasks=tasks, scope=scope, balance_groups=groups), schema, tasks,
               objective_for(cfg, tasks), device, group, model, balancer,
               make_optimizer(model, balancer, cfg, device, tables), autocast_dtype(cfg, device), placement, tables)


def resolved_paths(cfg: TrainConfig) -> TrainConfig:
    """The validated config with absolute paths: evaluate, predict and --resume must not depend on
    the working directory."""
    if not cfg.out:
        raise UserError("--out is required: the run directory to create")
    return dataclasses.replace(cfg.validate(), data=str(Path(cfg.data).resolve()), out=str(Path(cfg.out).resolve()),
                               tensorboard=str(Path(cfg.tensorboard).resolve()) if cfg.tensorboard else "")


def check_task_settings(cfg: TrainConfig, schema: Schema, tasks: list[str]) -> None:
    if cfg.select == "gauc" and not schema.user:
        raise UserError("--select gauc needs a user column: preprocess with --user, or select auc or logloss")
    if schema.positive_rate.get(tasks[0], 1.0) <= 0.0:
        raise UserError(f"the target task {tasks[0]!r} has no positive in the train split: "
                        "choose another --target or split the data differently")


def run_device(cfg: TrainConfig) -> tuple[torch.device, distributed.Group | None]:
    """The training device and, under torchrun, the process group (one GPU per local rank)."""
    device = resolve_device(cfg.device)
    group = distributed.from_env(device.type)
    if group and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, group


def balance_scope(cfg: TrainConfig, model, balancer, group) -> str:
    """The scope the balancer runs in (its default unless given), checked against the model and
    the number of processes."""
    if cfg.scope and cfg.scope not in SCOPES:
        raise UserError(f"--balance-scope must be one of {', '.join(SCOPES)}, not {cfg.scope!r}")
    if isinstance(model, SingleTask) and balancer.kind == "grad":
        raise UserError("--model single shares no parameters, so there is nothing to balance: "
                        "use --balancer ew (or a loss-weighting balancer)")
    scope = cfg.scope or balancer.default_scope
    if balancer.kind == "grad" and scope not in balancer.scopes:
        reason = f" ({balancer.scope_reason})" if balancer.scope_reason else ""
        raise UserError(f"{cfg.balancer} cannot run with --balance-scope {scope}: use {' or '.join(balancer.scopes)}"
                        f"{reason}")
    if group and balancer.kind == "grad" and scope == "representation" and not balancer.split_rows:
        # Each rank holds its samples' rows; only a balancer that reads them through sums over rows
        # (summed over the ranks) and row by row gives one process's result (docs/design.md).
        raise UserError(f"{cfg.balancer} cannot run with --balance-scope representation across processes (it reads "
                        "its gradients' rows beyond sums over them): use --balance-scope shared or all")
    return scope


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available: use --device cpu or auto")
    return torch.device(name)


def resolve_tasks(schema: Schema, target: str, tasks: list[str]) -> list[str]:
    """Task order: the target first, then the others as given (or as the schema lists them)."""
    labels = list(schema.labels)
    if not target:
        raise UserError(f"--target is required: choose one of {', '.join(labels)}")
    tasks = list(tasks) or labels
    for task in [target, *tasks]:
        if task not in labels:
            raise UserError(f"unknown task {task!r}: the data has labels {', '.join(labels)}")
    if len(set(tasks)) != len(tasks):
        raise UserError("--tasks lists a task twice")
    return [target] + [t for t in tasks if t != target]


def data_placement(cfg: TrainConfig, train: ParquetSplit, device: torch.device) -> str:
    """device, host or stream: ``auto`` streams a train split larger than the memory budget (given,
    or half of the memory available now), else keeps it on the device when it fits there."""
    if cfg.data_placement != "auto":
        return cfg.data_placement
    budget = cfg.memory_budget_gb * 2**30 if cfg.memory_budget_gb else available_memory() / 2
    if train.nbytes > budget:
        return "stream"
    return "device" if fits_on_device(train, device) else "host"


def objective_for(cfg: TrainConfig, tasks: list[str]) -> Objective:
    return Objective(tasks, parse_conditions(cfg.conditions, tasks), esmm=cfg.model == "esmm")


def feature_names(schema: Schema) -> tuple[list[str], list[str]]:
    """(code columns in model order: the flat categoricals, then the sequences; numeric columns)."""
    categorical = [f.name for f in schema.categorical_features] + [f.name for f in schema.sequence_features]
    numeric = [f.name for f in schema.numeric_features]
    return categorical, numeric


def sequence_fields(schema: Schema) -> list[SequenceField]:
    """The schema's sequence features as the model sees them (shared rows by field index)."""
    index = {f.name: i for i, f in enumerate(schema.categorical_features)}
    fields = []
    for f in schema.sequence_features:
        shared = index.get(f.share_with) if f.share_with else None
        if f.share_with and shared is None:
            raise UserError(f"schema.json: sequence {f.name!r} shares rows with {f.share_with!r}, which is not a "
                            "categorical feature: re-run mtrec preprocess")
        fields.append(SequenceField(f.name, f.max_len, f.pooling or "mean", 0 if shared is not None else f.vocab_size,
                                    shared, shared if f.pooling == "attention" else None))
    return fields


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The model's view of the run's config: ModelConfig's fields are TrainConfig fields of the
    same names (tests/engine/test_config.py holds them to it), so nothing is renamed on the way."""
    return ModelConfig(**{f.name: copy.copy(getattr(cfg, f.name)) for f in dataclasses.fields(ModelConfig)})


def start_rates(schema: Schema, tasks: list[str], objective: Objective) -> list[float]:
    """Each tower's starting positive rate: the train rate, or for a conditional task its rate
    among the rows where its condition holds (labels nest: purchase implies click)."""
    rates = []
    for t in tasks:
        rate = schema.positive_rate[t]
        given = objective.conditions.get(t)
        if given and schema.positive_rate.get(given, 0.0) > 0.0:
            rate = min(rate / schema.positive_rate[given], 1.0)
        rates.append(rate)
    return rates


def build_for(cfg: TrainConfig, schema: Schema, tasks: list[str]):
    """Model and balancer for a config and a schema (shared by train, resume and evaluate)."""
    vocab = [f.vocab_size for f in schema.categorical_features]
    rates = start_rates(schema, tasks, objective_for(cfg, tasks))
    model = build_model(cfg.model, vocab, len(schema.numeric_features), rates, model_config(cfg),
                        sequence_fields(schema))
    balancer = balancers.build(cfg.balancer, num_tasks=len(tasks), **cfg.balancer_opts)
    return model, balancer


def make_optimizer(model, balancer, cfg: TrainConfig, device: torch.device, tables=None):
    """Adam over the dense parameters and the balancer's learned parameters (UW's log-variances:
    no weight decay), fused on CUDA; the embedding tables get ``cfg.embedding_optimizer``
    (mtrec/optim.py: sparse rows for lazy-adam / rowwise-adagrad, the same Adam for adam). Sharded
    ``tables`` are updated by FBGEMM in the backward; the optimizer only hands them the lr and
    saves their state (``sharded_tables.FusedTableOptimizer``)."""
    balancer_params = [p for p in balancer.parameters() if p.requires_grad]
    if tables is not None:  # the model holds no table parameter: "adam" is the same dense Adam alone
        dense = build_optimizer(model, balancer_params, "adam", cfg.lr, cfg.weight_decay,
                                fused=device.type == "cuda" or None)
        return CombinedOptimizer(dense, sharded_tables.FusedTableOptimizer(tables, cfg.lr, cfg.weight_decay))
    return build_optimizer(model, balancer_params, cfg.embedding_optimizer, cfg.lr, cfg.weight_decay,
                           fused=device.type == "cuda" or None)


def use_deterministic_kernels() -> None:
    """``--deterministic``: on CUDA the embedding backward and ``index_add_`` sum with atomics in
    whatever order the threads arrive, so two runs (or a run and its resume) differ in the last bits;
    this picks the deterministic kernels instead (process-wide), and cuBLAS a fixed workspace, which
    it reads before its first call. CPU kernels are deterministic already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
