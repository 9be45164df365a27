"""One configuration from the command line to the model: the model's settings are TrainConfig
fields of the same names and defaults, every train flag is a field, and a run saves the resolved
config once (config.json == the checkpoint's config)."""

import dataclasses
import json

import typer

from mtrec.cli import app
from mtrec.core.config import TrainConfig
from mtrec.engine.build import model_config
from mtrec.models import ModelConfig


def test_model_settings_are_train_config_fields_with_the_same_defaults():
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    for f in dataclasses.fields(ModelConfig):
        assert f.name in train, f.name
        assert getattr(ModelConfig(), f.name) == getattr(defaults, f.name), f.name
    cfg = TrainConfig(num_experts=7, expert_sizes=[9, 3], levels=2)
    got = model_config(cfg)
    assert (got.num_experts, got.expert_sizes, got.levels) == (7, [9, 3], 2)
    got.expert_sizes.append(1)
    assert cfg.expert_sizes == [9, 3]  # the model's copy is its own


def test_every_train_option_is_a_config_field_or_a_command_switch():
    command = typer.main.get_command(app).commands["train"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    switches = {"config", "force", "resume", "quiet", "balancer_opt"}  # balancer_opt fills balancer_opts
    names = {p.name for p in command.params}
    assert names - fields - switches == set()
    assert fields - names == {"balancer_opts", "eval_batch_size"}  # TOML only


def test_config_json_is_the_checkpoints_config_with_resolved_settings(encoded_synthetic, tmp_path):
    from typer.testing import CliRunner

    from mtrec.engine import checkpoint

    data = encoded_synthetic("config", rows=3_000, seed=1) / "data"
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--model", "mmoe", "--target", "share", "--balancer",
                                      "pcgrad", "--epochs", "1", "--embedding-dim", "4", "--expert-sizes", "8",
                                      "--tower-sizes", "4", "--experts", "2", "--quiet", "--out", str(run)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    _, meta = checkpoint.load(run / "last.pt")
    assert {k: v for k, v in saved.items() if k != "mtrec_version"} == meta["config"]
    assert saved["tasks"][0] == "share" and len(saved["tasks"]) == 3  # resolved order, target first
    assert saved["scope"] and saved["balance_groups"]  # the balancer's defaults, written down
    assert saved["num_experts"] == 2 and saved["expert_sizes"] == [8]
