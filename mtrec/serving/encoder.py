"""Which encoder scores a run's inputs: the run's own copy of its vocabularies and statistics.

``mtrec train`` keeps in the run directory what encoding needs (``schema.json``, ``vocab/``,
``encoder.json`` with their fingerprint; ``mtrec.engine.rundir``), so a run encodes raw logs the
way it was trained whatever later happens to its data folder. Encoded splits are scored only when
their data folder still has the run's fingerprint. Runs made before the copy existed encode with
their data folder as they always did, checked by feature names, kinds and vocabulary sizes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtrec.core.errors import UserError
from mtrec.core.files import read_json_object
from mtrec.data.fingerprint import encoder_fingerprint
from mtrec.data.schema import Schema
from mtrec.engine.rundir import ENCODER


@dataclass
class Encoder:
    schema: Schema  # the features with their statistics, as encode reads them
    vocab_dir: Path
    fingerprint: str | None  # None: a run older than the copy, encoding with its data folder
    where: str  # for messages: the run's copy or the data folder


def run_fingerprint(run_dir: str | Path) -> str | None:
    """The fingerprint recorded in the run's ``encoder.json``, or None for an older run."""
    path = Path(run_dir) / ENCODER
    if not path.is_file():
        return None
    fix = "the run directory is damaged, train again"
    fingerprint = read_json_object(path, fix).get("fingerprint")
    if not isinstance(fingerprint, str):
        raise UserError(f"{path} is incomplete (no fingerprint): {fix}")
    return fingerprint


def run_encoder(run_dir: str | Path, cfg, run_schema: Schema, data: str | None = None) -> Encoder:
    """The encoder for raw logs: the run's own copy (checked against its fingerprint), or for an
    older run the data folder (``data`` or the one it trained on). A ``data`` folder passed to a
    run with its own copy must have the same fingerprint."""
    run_dir = Path(run_dir)
    recorded = run_fingerprint(run_dir)
    if recorded is None:
        data_dir = Path(data) if data else Path(cfg.data)
        if not (data_dir / "schema.json").is_file():
            raise UserError(f"the run's data directory {data_dir} (with the vocabularies) is not there and the run "
                            "is older than mtrec's own copy of them: pass --data DIR, the directory mtrec "
                            "preprocess wrote for this run")
        schema = Schema.load(data_dir)
        check_same_schema(run_schema, schema, data_dir)
        return Encoder(schema, data_dir / "vocab", None, str(data_dir))
    actual = encoder_fingerprint(run_schema, run_dir / "vocab")
    if actual != recorded:
        raise UserError(f"the vocabularies in {run_dir / 'vocab'} no longer match the run's fingerprint (a file was "
                        "changed or removed): the run cannot encode raw logs; train again")
    if data is not None:
        check_encoded_data(run_dir, run_schema, Path(data))
    return Encoder(run_schema, run_dir / "vocab", recorded, str(run_dir))


def check_encoded_data(run_dir: str | Path, run_schema: Schema, data_dir: Path) -> Schema:
    """The schema of an encoded data folder whose codes mean what they meant in training."""
    schema = Schema.load(data_dir)
    recorded = run_fingerprint(run_dir)
    if recorded is not None and encoder_fingerprint(schema, data_dir / "vocab") != recorded:
        if [f.name for f in schema.features] != [f.name for f in run_schema.features]:
            check_same_schema(run_schema, schema, data_dir)  # other features: say that
        raise UserError(f"{data_dir} was encoded with other vocabularies or statistics than run {run_dir} (it was "
                        "preprocessed again since): its codes would be scored wrongly; score raw logs with --raw, "
                        "or train on it")
    check_same_schema(run_schema, schema, data_dir)
    return schema


def check_same_schema(run_schema: Schema, data_schema: Schema, data_dir) -> None:
    def shape(s):
        return [(f.name, f.kind, f.vocab_size if f.kind != "numeric" else None) for f in s.features]

    if shape(run_schema) != shape(data_schema) or not set(run_schema.labels) <= set(data_schema.labels):
        raise UserError(f"the data in {data_dir} has other features or tasks than the run was trained on: "
                        "evaluate on data made by the same mtrec preprocess run (or pass --raw logs)")
