"""``mtrec train``: flags, a TOML file or a saved run's config become one ``TrainConfig``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtrec.cli.app import command, split_list
from mtrec.cli.render import metrics_table
from mtrec.core.console import console, err_console
from mtrec.core.errors import UserError


@command()
def train(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(help="Directory made by mtrec preprocess.")] = None,
    model: Annotated[Optional[str], typer.Option(help="single, shared-bottom, mmoe, ple or esmm.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Target task (task 0; --select and early stopping use it).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated tasks (default: every label).")] = None,
    conditions: Annotated[Optional[list[str]], typer.Option(
        "--condition", help="TASK:GIVEN, e.g. purchase:click: TASK is trained and scored only where GIVEN = 1 (repeat).")] = None,
    balancer: Annotated[Optional[str], typer.Option(help="Balancer name (see mtrec balancers).")] = None,
    balancer_opt: Annotated[Optional[list[str]], typer.Option(help="Balancer hyperparameter key=value (repeat).")] = None,
    scope: Annotated[Optional[str], typer.Option(
        "--balance-scope", help="shared, all or representation (default: the balancer's, see mtrec balancers).")] = None,
    balance_groups: Annotated[Optional[str], typer.Option(
        help="tensor or part: one group per tensor, or per expert / field (default: the balancer's).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Adam weight decay.")] = None,
    embedding_optimizer: Annotated[Optional[str], typer.Option(
        help="Embedding rows: lazy-adam (default: touched rows only), rowwise-adagrad, or adam (dense).")] = None,
    embedding_sharding: Annotated[Optional[str], typer.Option(
        help="none, or torchrec: shard the embedding table across the torchrun ranks (pip install 'mtrec[torchrec]', see docs/design.md).")] = None,
    embedding_sharding_plan: Annotated[Optional[str], typer.Option(
        help="With --embedding-sharding torchrec: auto (TorchRec's planner), table-wise, row-wise or column-wise.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (init, shuffling).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA), fp32 or bf16.")] = None,
    deterministic: Annotated[Optional[bool], typer.Option(
        help="Deterministic CUDA kernels: bit-for-bit reruns and resume on CUDA too, at some speed (CPU always is).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(
        help="constant, cosine or linear (decay towards 0 over all planned steps, after the warmup).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Steps of linear learning-rate warmup (0: none).")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(
        help="Clip the global norm of the applied gradients, after balancing (0: off).")] = None,
    select: Annotated[Optional[str], typer.Option(
        help="Target-task validation metric for best.pt and early stopping: auc, gauc or logloss.")] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(help="Embedding width.")] = None,
    num_experts: Annotated[Optional[int], typer.Option("--experts", help="MMoE experts.")] = None,
    levels: Annotated[Optional[int], typer.Option(help="PLE levels (1 = CGC).")] = None,
    expert_sizes: Annotated[Optional[str], typer.Option(help="Expert / bottom layer sizes, e.g. 256,128.")] = None,
    tower_sizes: Annotated[Optional[str], typer.Option(help="Tower layer sizes, e.g. 64.")] = None,
    shared_experts: Annotated[Optional[int], typer.Option(help="PLE shared experts per level.")] = None,
    task_experts: Annotated[Optional[int], typer.Option(help="PLE experts per task per level.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in experts and towers.")] = None,
    ndcg_k: Annotated[Optional[int], typer.Option(help="K of NDCG@K.")] = None,
    data_placement: Annotated[Optional[str], typer.Option(
        help="device, host, stream (row groups from disk, shuffled in a buffer) or auto (stream when the "
             "train split exceeds --memory-budget, else device when it fits there).")] = None,
    shuffle_buffer: Annotated[Optional[int], typer.Option(help="Rows shuffled together when streaming.")] = None,
    memory_budget_gb: Annotated[Optional[float], typer.Option(
        "--memory-budget", help="GiB a split may take in memory before auto streams it (default: half the available memory).")] = None,
    diagnostics_every: Annotated[Optional[int], typer.Option(help="Gradient diagnostics every N steps (0: off).")] = None,
    max_bad_steps: Annotated[Optional[int], typer.Option(help="Non-finite steps in a row before stopping.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save last.pt every N steps (0: epochs only).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory to create.")] = None,
    tensorboard: Annotated[Optional[str], typer.Option(
        help="Also write the logged scalars as TensorBoard events here (pip install 'mtrec[tensorboard]').")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with any of these settings.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run directory.")] = False,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run in this directory from last.pt.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Train a multi-task model with a gradient balancer."""
    from mtrec.core.config import TrainConfig, parse_opt, read_toml
    from mtrec.engine.loop import train as run

    if resume:
        values = _saved_config(resume)
        values.update(_resume_changes(ctx, values, resume))
    else:
        values = read_toml(config) if config else {}
        values.update(_config_flags(ctx))
        if balancer_opt:
            values["balancer_opts"] = {**values.get("balancer_opts", {}), **dict(parse_opt(o) for o in balancer_opt)}
        if not values.get("data"):
            raise UserError("missing DATA: the directory made by mtrec preprocess")
    cfg = TrainConfig.from_dict(values)
    result = run(cfg, resume=bool(resume), force=force, quiet=quiet)
    from mtrec.engine.distributed import is_main_process

    if not is_main_process():
        return
    if result["history"] and result["best_epoch"] >= 1:
        best = result["history"][result["best_epoch"] - 1]["valid"]
        console.print(metrics_table(best, f"best validation (epoch {result['best_epoch']}, by {cfg.select})",
                                    cfg.ndcg_k))
    elif result["history"]:
        err_console.print(f"warning: no epoch gave a defined validation {cfg.select} for {cfg.target}, so there "
                          "is no best.pt; showing the last epoch", markup=False, highlight=False, soft_wrap=True)
        last = result["history"][-1]
        console.print(metrics_table(last["valid"], f"last validation (epoch {last['epoch']})", cfg.ndcg_k))
    console.print(f"run saved in {result['run_dir']}  (evaluate: mtrec evaluate {result['run_dir']})")


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in split_list(text)]
    except ValueError as err:
        raise UserError(f"{flag} expects comma-separated integers like 256,128, got {text!r}") from err


# What --resume may change: none of it alters what the saved state means.
RESUMABLE = ("epochs", "patience", "device", "checkpoint_every", "max_bad_steps")


def _config_flags(ctx: typer.Context) -> dict:
    """The TrainConfig fields given as flags: the command's parameters carry the fields' names, so
    no setting is renamed between the command line, the TOML file and the model."""
    from mtrec.core.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    lists = {"expert_sizes": "--expert-sizes", "tower_sizes": "--tower-sizes"}
    values = {}
    for name, value in ctx.params.items():
        if name not in fields or value is None:
            continue
        if name in lists:
            value = _int_list(value, lists[name])
        elif name == "tasks":
            value = split_list(value)
        elif name == "conditions":
            value = list(value)
        values[name] = value
    return values


def _resume_changes(ctx: typer.Context, saved: dict, run_dir: str) -> dict:
    """The settings given with --resume (flags, a --config file) that differ from the saved run's:
    re-running the same command with --resume added is accepted; a real change is refused, in one
    line naming each changed setting, unless it is resumable."""
    from mtrec.core.config import TrainConfig, parse_opt, read_toml

    given = {name for name in ctx.params if name not in ("resume", "quiet")
             and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}
    if "force" in given:
        raise UserError("--force starts the run over and --resume continues it: pass one of the two")
    requested = read_toml(ctx.params["config"]) if "config" in given else {}
    requested.update({k: v for k, v in _config_flags(ctx).items() if k in given})
    if "balancer_opt" in given:
        flags = dict(parse_opt(o) for o in ctx.params["balancer_opt"])
        requested["balancer_opts"] = {**requested.get("balancer_opts", {}), **flags}
    before = TrainConfig.from_dict(saved)
    after = TrainConfig.from_dict({**saved, **requested})
    changed = [key for key in requested if _setting(after, key, run_dir) != _setting(before, key, run_dir)]
    refused = [key for key in changed if key not in RESUMABLE]
    if refused:
        flag = {p.name: (p.opts[0] if p.opts[0].startswith("-") else p.name.upper()) for p in ctx.command.params}
        names = ", ".join(f"{flag.get(k, k)} (saved {getattr(before, k)!r}, given {getattr(after, k)!r})"
                          for k in refused)
        allowed = ", ".join(flag[n] for n in RESUMABLE)
        raise UserError(f"--resume continues the saved run as it was configured, so {names} cannot change: only "
                        f"{allowed} and --quiet can (start a new run to change the rest)")
    return {key: getattr(after, key) for key in changed}


def _setting(cfg, key: str, run_dir: str):
    """A config value as the run uses it: paths resolved (``out`` is the run directory whatever the
    saved one), tasks in the run's order (the target first)."""
    value = getattr(cfg, key)
    if key == "out":
        return Path(value).resolve() == Path(run_dir).resolve()
    if key in ("data", "tensorboard"):
        return str(Path(value).resolve()) if value else ""
    if key == "tasks":
        return [cfg.target] + [t for t in value if t != cfg.target] if value else value
    return value


def _saved_config(run_dir: str) -> dict:
    from mtrec.core.config import read_run_config

    values = read_run_config(run_dir)
    values.setdefault("embedding_optimizer", "adam")  # runs from before the flag updated tables densely
    if "balance_groups" not in values:  # runs from before the faithful defaults balanced per tensor, IMTL-G only
        values["balance_groups"] = "tensor"
        if values.get("balancer") == "imtl":
            values["balancer_opts"] = {"variant": "gradient", **values.get("balancer_opts", {})}
    values["out"] = str(run_dir)
    return values
