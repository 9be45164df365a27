"""Writing files whole or not at all: a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from mtrec.core.errors import UserError


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; the temp file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


def check_replaceable(out: Path, force: bool, kind: str, ours, what: str) -> None:
    """An ``--out`` file may be replaced only with --force, and only when ``ours(out)`` finds the
    marker mtrec left in it (what cannot be read is not ours): never a folder, never a user's file.
    ``kind`` names the file to ask for (".parquet"), ``what`` what mtrec writes there."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: name a {kind} file")
    if not out.exists():
        return
    if not force:
        raise UserError(f"{out} exists: pass --force to overwrite it, or choose another --out")
    try:
        mine = ours(out)
    except UserError:  # e.g. the reader's package is missing: that is the error to show
        raise
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        mine = False
    if not mine:
        raise UserError(f"--out {out} is not {what}: --force only replaces those; choose another --out")


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that mtrec wrote and expects to hold one object; a corrupt, truncated or
    hand-broken file is a ``UserError`` naming it and ``fix``, not a traceback."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupt or truncated ({err}): {fix}") from err
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}): {fix}") from err
    if not isinstance(value, dict):
        raise UserError(f"{path} is corrupt: it holds a JSON {type(value).__name__}, not an object: {fix}")
    return value


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (metrics.jsonl, diagnostics.jsonl); a broken line is a ``UserError``."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is corrupt ({err}): restore or remove the file") from err
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is not a JSON object: restore or remove the file")
            records.append(record)
    return records


def strict_json(value, indent: int | None = 2) -> str:
    """``value`` as strict JSON (RFC 8259): a non-finite float (an undefined metric's NaN) becomes
    null, since ``json.dumps`` would write the bare ``NaN`` that ``jq`` and JSON.parse reject."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(value), indent=indent, allow_nan=False)
