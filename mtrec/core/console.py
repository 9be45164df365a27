"""The one rich Console for output and the one for messages on stderr: every layer prints through
these, so tests and ``--quiet`` modes have one place to look."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
