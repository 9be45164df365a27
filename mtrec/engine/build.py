"""Building a run from its configuration: device and precision, tasks and their objective, the
model, balancer and optimizer, and where the data lives. One home for what ``train``,
``evaluate`` and ``predict`` all need (so none of them imports another)."""

from __future__ import annotations

import copy
import dataclasses

import torch

from mtrec import balancers
from mtrec.core.config import TrainConfig
from mtrec.core.errors import UserError
from mtrec.data.schema import Schema
from mtrec.data.stream import ParquetSplit, available_memory
from mtrec.data.tensors import fits_on_device
from mtrec.engine.objective import Objective, parse_conditions
from mtrec.engine.optim import build_optimizer
from mtrec.models import ModelConfig, SequenceField
from mtrec.models import build as build_model


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


def make_optimizer(model, balancer, cfg: TrainConfig, device: torch.device):
    """Adam over the dense parameters and the balancer's learned parameters (UW's log-variances:
    no weight decay), fused on CUDA; the embedding tables get ``cfg.embedding_optimizer``
    (mtrec/optim.py: sparse rows for lazy-adam / rowwise-adagrad, the same Adam for adam)."""
    balancer_params = [p for p in balancer.parameters() if p.requires_grad]
    return build_optimizer(model, balancer_params, cfg.embedding_optimizer, cfg.lr, cfg.weight_decay,
                           fused=device.type == "cuda" or None)


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
