"""The Typer app, defined once, and ``command``: the one place where errors become exit codes.

User mistakes raise ``UserError`` anywhere below; a command turns them into one line on stderr and
exit code 2 (``--debug`` shows the traceback). Ctrl-C during training exits 130 after saving.
"""

from __future__ import annotations

import functools
import traceback
from typing import Annotated, Optional

import typer

from mtrec.core.console import err_console
from mtrec.core.errors import TrainingInterrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train multi-task CTR / recommendation models with gradient balancers.")
_debug = {"on": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False):
    _debug["on"] = debug


def command(name: str | None = None):
    """``app.command`` plus the one place where errors become exit codes: a UserError prints one
    line and exits 2; Ctrl-C during training exits 130 after its checkpoint."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                if _debug["on"]:
                    traceback.print_exc()
                err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except TrainingInterrupted as stop:
                err_console.print(f"interrupted: checkpoint saved; continue with: mtrec train --resume "
                                  f"{stop.run_dir}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        return app.command(name)(run)

    return decorate


def split_list(text: Optional[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []
