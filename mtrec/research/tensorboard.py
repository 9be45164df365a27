"""``mtrec plot --tensorboard``: a run's metrics.jsonl and diagnostics.jsonl (or every cell of a
compare directory) replayed as TensorBoard events, with the tags of ``mtrec.engine.events``."""

from __future__ import annotations

from pathlib import Path

from mtrec.core.config import run_tasks
from mtrec.core.errors import UserError
from mtrec.core.files import read_jsonl
from mtrec.engine.events import EventLog


def export_run(run_dir: str | Path, log_dir: str | Path) -> int:
    """Write a run's logged scalars as TensorBoard events into an empty ``log_dir``. Returns how
    many scalars were written."""
    run_dir, log_dir = Path(run_dir), Path(log_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} has no metrics.jsonl yet: export after its first epoch")
    if log_dir.exists() and any(log_dir.glob("events.out.tfevents.*")):
        raise UserError(f"{log_dir} holds TensorBoard events already: choose an empty folder")
    tasks = run_tasks(run_dir)
    log = EventLog(log_dir, tasks)
    try:
        for record in read_jsonl(run_dir / "metrics.jsonl"):
            log.epoch(record)
        if (run_dir / "diagnostics.jsonl").exists():
            for record in read_jsonl(run_dir / "diagnostics.jsonl"):
                log.diagnostics(record)
    finally:
        log.close()
    return log.count


def export(source: str | Path, log_dir: str | Path) -> list[tuple[str, int]]:
    """Export a run, or every trained cell of a compare directory into ``log_dir/<cell>``.
    Returns [(run, scalars written)]."""
    source, log_dir = Path(source), Path(log_dir)
    if (source / "compare.json").exists():
        from mtrec.research.compare import load_grid

        cells = [c.name for c in load_grid(source).cells if (source / c.name / "metrics.jsonl").exists()]
        if not cells:
            raise UserError(f"{source} has no trained cell yet: run mtrec compare first")
        return [(str(source / name), export_run(source / name, log_dir / name)) for name in cells]
    if not (source / "config.json").exists():
        raise UserError(f"{source} is neither a run directory (config.json) nor a compare directory (compare.json)")
    return [(str(source), export_run(source, log_dir))]
