"""build(): unknown names and bad hyperparameters are UserErrors that name the valid choices."""

import pytest

from mtrec.balancers import build, hparams, names
from mtrec.core.errors import UserError


def test_unknown_name_lists_the_choices():
    with pytest.raises(UserError, match="unknown balancer 'metabalnce'.*metabalance.*gradcraft"):
        build("metabalnce", num_tasks=2)


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown hyperparameter\(s\) relaxx \(valid: relax, beta, mode\)"):
        build("metabalance", num_tasks=2, relaxx=0.5)
    with pytest.raises(UserError, match=r"valid: none"):
        build("ew", num_tasks=2, anything=1)


@pytest.mark.parametrize("name,options,message", [
    ("metabalance", {"relax": 1.0}, r"relax must be a number in \[0, 1\)"),
    ("metabalance", {"relax": -0.1}, r"relax must be a number in \[0, 1\)"),
    ("metabalance", {"beta": 1}, r"beta must be a number in \[0, 1\)"),
    ("metabalance", {"mode": "shrink"}, "mode must be one of both, reduce_only, enlarge_only"),
    ("metabalance", {"relax": "high"}, r"relax must be a number in \[0, 1\)"),
    ("metabalance", {"relax": True}, r"relax must be a number"),
    ("gradcraft", {"tau": -1}, r"tau must be a number in \[0, 1\]"),
    ("gradcraft", {"eps": -1e-10}, r"eps must be a number in \[0, inf\)"),
    ("cograd", {"gamma": -0.1}, r"gamma must be a number or a list of 2 numbers"),
    ("cograd", {"hessian": "full"}, "hessian must be one of diag-rms, diag-raw, outer, hvp, hvp-raw"),
    ("cograd", {"hessian": "hvp", "lam": -1}, r"lam must be a number in \[0, inf\)"),
    ("cograd", {"hessian": "diag"}, "'diag-raw' is the former literal element-wise form"),
    ("upgrad", {"reg_eps": -1e-4}, r"reg_eps must be a number in \[0, 1\]"),
    ("pcd", {"tau": 1.5}, r"tau must be a number in \[0, 1\]"),
    ("fairgrad", {"alpha": -1}, r"alpha must be a number in \[0, 100\]"),
    ("fairgrad", {"iterations": 0}, r"iterations must be an integer in \[1, 1000\]"),
    ("rlw", {"seed": -1}, r"seed must be an integer in \[0, 4294967295\]"),
    ("cagrad", {"c": -0.5}, r"c must be a number in \[0, inf\)"),
    ("cagrad", {"rescale": 3}, r"rescale must be an integer in \[0, 2\]"),
    ("gradnorm", {"alpha": -1}, r"alpha must be a number in \[0, inf\)"),
    ("dwa", {"temperature": -2}, r"temperature must be a number in \(0, inf\)"),
    ("dwa", {"window": 0.5}, r"window must be an integer"),
    ("weights", {"weights": [1, 2, 3]}, "weights must be a list of 2 numbers"),
    ("weights", {"weights": [1, -1]}, r"weights must be a list of 2 numbers \(one per task\) in \[0, inf\)"),
    ("weights", {"weights": [0, 0]}, "must not all be zero"),
    ("pcgrad", {"reduction": "max"}, "reduction must be one of sum, mean"),
    ("gradvac", {"beta": 0}, r"beta must be a number in \(0, 1\]"),
    ("gradvac", {"group": "layer"}, "group must be one of model, tensor"),
    ("mgda", {"normalize": "loss++"}, "normalize must be one of none, l2, loss, loss\\+"),
    ("nash-mtl", {"max_norm": -1}, r"max_norm must be a number in \[0, inf\)"),
    ("db-mtl", {"beta": 1.0}, r"beta must be a number in \[0, 1\)"),
    ("famo", {"lr": 0}, r"lr must be a number in \(0, inf\)"),
])
def test_out_of_range_values_name_the_valid_range(name, options, message):
    with pytest.raises(UserError, match=message):
        build(name, num_tasks=2, **options)


def test_typed_values_are_accepted():
    b = build("metabalance", num_tasks=3, relax=0, beta="0.5", mode="reduce_only")  # int where float
    assert (b.relax, b.beta, b.mode) == (0.0, 0.5, "reduce_only")
    assert build("cograd", num_tasks=2, gamma=[1, 0.5]).gamma.tolist() == [1.0, 0.5]
    assert build("weights", num_tasks=3, weights="1,0.5,0.5").task_weights.tolist() == [1.0, 0.5, 0.5]
    assert build("cagrad", num_tasks=2, rescale=2.0).rescale == 2


def test_num_tasks_must_be_positive():
    with pytest.raises(UserError, match="num_tasks"):
        build("ew", num_tasks=0)


@pytest.mark.parametrize("name", names())
def test_every_balancer_builds_with_its_defaults(name):
    b = build(name, num_tasks=3)
    assert b.name == name and b.kind in ("loss", "grad")
    # The defaults the `mtrec balancers` table shows are valid values when passed back explicitly.
    build(name, num_tasks=3, **hparams(name))


# What each method's paper / official code balances (docs/balancers.md, "Differences from the reference").
FAITHFUL_DEFAULTS = {
    "metabalance": ("all", "part"), "gradcraft": ("all", "-"), "cograd": ("all", "tensor"), "gradnorm": ("all", "-"),
    "pcgrad": ("all", "-"), "mgda": ("representation", "-"), "cagrad": ("all", "-"), "imtl": ("all", "-"),
    "gradvac": ("all", "-"), "aligned-mtl": ("all", "-"), "db-mtl": ("shared", "-"), "nash-mtl": ("all", "-"),
    "upgrad": ("all", "-"), "pcd": ("all", "-"), "fairgrad": ("all", "-"),
}


def test_balancers_command_shows_each_default_scope_and_groups():
    import re

    from typer.testing import CliRunner

    from mtrec.cli import app

    result = CliRunner().invoke(app, ["balancers"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in names():
        scope, groups = FAITHFUL_DEFAULTS.get(name, ("-", "-"))  # loss weightings have neither
        row = re.compile(rf"^. {re.escape(name)} +. (grad|loss) +. .* . {re.escape(scope)} +. {re.escape(groups)} +. ")
        assert any(row.match(line) for line in lines), (name, scope, groups)


def test_imtl_variants_and_balance_groups_are_checked():
    from mtrec.core.config import TrainConfig

    assert build("imtl", num_tasks=2).variant == "hybrid"
    with pytest.raises(UserError, match="variant must be one of hybrid, gradient, loss"):
        build("imtl", num_tasks=2, variant="geometric")
    with pytest.raises(UserError, match="--balance-groups must be tensor or part, not 'layer'"):
        TrainConfig(balance_groups="layer").validate()


@pytest.mark.parametrize("flags,scope,groups", [([], "all", "part"),
                                                (["--balance-scope", "shared", "--balance-groups", "tensor"],
                                                 "shared", "tensor")])
def test_train_runs_metabalance_with_its_defaults_or_the_flags(encoded_synthetic, tmp_path, flags, scope, groups):
    """`mtrec train --balancer metabalance` runs MetaBalance as published (scope all, per part) unless
    --balance-scope / --balance-groups say otherwise; the run records what it used."""
    import json

    from typer.testing import CliRunner

    from mtrec.cli import app

    data = encoded_synthetic("faithful", rows=3_000, seed=5) / "data"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--target", "like", "--balancer", "metabalance", *flags,
                                      "--epochs", "1", "--embedding-dim", "4", "--experts", "2", "--batch-size",
                                      "1024", "--quiet", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["scope"], config["balance_groups"]) == (scope, groups)


def test_a_run_saved_before_the_faithful_defaults_resumes_as_it_was_trained(tmp_path):
    """Its config has no balance_groups (it balanced per tensor) and its IMTL was IMTL-G alone: the
    resumed run keeps both, so the checkpointed state still fits."""
    import json

    from mtrec.cli.train import _saved_config

    old = {"data": str(tmp_path), "out": str(tmp_path), "balancer": "imtl", "scope": "shared", "balancer_opts": {}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    values = _saved_config(str(tmp_path))
    assert values["balance_groups"] == "tensor" and values["balancer_opts"] == {"variant": "gradient"}
    new = {**old, "balancer": "metabalance", "balance_groups": "part"}
    (tmp_path / "config.json").write_text(json.dumps(new))
    assert _saved_config(str(tmp_path))["balance_groups"] == "part"
