"""The training progress line: a rich bar per epoch with samples/s, running loss per task,
skipped and clipped steps (hidden when output is not a terminal)."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mtrec.core.console import console


class TrainProgress:
    """A progress bar per epoch with samples/s, running loss per task, skipped and clipped steps."""

    def __init__(self, tasks: list[str], quiet: bool = False):
        self.tasks = tasks
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, disable=quiet or not console.is_terminal, transient=True)
        self.bar = None
        self.started = time.perf_counter()
        self.samples = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        self.bar = self.progress.add_task(f"epoch {epoch + 1}", total=steps, completed=done, info="")
        self.started, self.samples = time.perf_counter(), 0

    def update(self, steps: int, samples: int, mean_losses: list[float], bad_steps: int,
               clipped_steps: int = 0) -> None:
        self.samples += samples
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        losses = " ".join(f"{t}={v:.4f}" for t, v in zip(self.tasks, mean_losses))
        info = (f"{rate:,.0f} samples/s  {losses}" + (f"  skipped={bad_steps}" if bad_steps else "")
                + (f"  clipped={clipped_steps}" if clipped_steps else ""))
        self.progress.update(self.bar, advance=steps, info=info)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(time.perf_counter() - self.started, 1e-9)
