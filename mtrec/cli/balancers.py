"""``mtrec balancers``: the registry as a table."""

from __future__ import annotations

from mtrec.cli.app import command
from mtrec.cli.render import simple_table
from mtrec.core.console import console


@command("balancers")
def list_balancers():
    """List the registered balancers: what they need, their default scope and groups (as their papers /
    official code run them; --balance-scope and --balance-groups override), hyperparameters, papers."""
    from mtrec import balancers as registry

    rows = []
    for info in registry.describe():
        hp = ", ".join(f"{k}={v}" for k, v in info["hparams"].items()) or "-"
        rows.append([info["name"], info["kind"], info["needs"], info["default_scope"], info["default_groups"], hp,
                     info["paper"]])
    table = simple_table("balancers", ["name", "kind", "needs", "scope", "groups", "hyperparameters (defaults)",
                                       "paper"], rows)
    for i in (0, 1, 3, 4):  # names, kinds, scopes and groups whole, however narrow the terminal
        table.columns[i].no_wrap, table.columns[i].min_width = True, max(len(str(row[i])) for row in rows)
    console.print(table)
