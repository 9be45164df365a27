"""The command line (the top layer): one module per command group, each command a thin function
(typed options, then one call into a plain function of a lower layer), registered on the one Typer
app of ``app.py``. May import every layer below; nothing imports it.

``mtrec`` runs ``main``; importing the command modules here registers them, in the order ``mtrec
--help`` lists them.
"""

# Importing a command module registers its commands, in this order (not sorted on purpose).
from mtrec.cli.app import app  # noqa: I001
from mtrec.cli import data, train, serving, balancers, research  # noqa: F401

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="mtrec")
