"""``schema.json``: what ``mtrec preprocess`` wrote, and everything needed to encode more raw logs.

The file format is documented in ``docs/data-format.md``; this module is its only reader and writer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write_text

FORMAT = "mtrec-encoded"
VERSION = 1
KINDS = ("categorical", "numeric", "sequence")


@dataclass
class Feature:
    """One model input column. Categorical features carry a vocabulary (or hash buckets, or quantile
    buckets); numeric features carry the statistics that standardise them; sequence features (list
    columns) encode their last ``max_len`` elements with their own vocabulary, hash buckets, or the
    vocabulary of the categorical column named by ``share_with``."""

    name: str
    kind: str  # "categorical" | "numeric" | "sequence"
    dtype: str = ""  # Polars dtype of the raw column, e.g. "Int64", "String"
    # categorical
    vocab_size: int | None = None  # codes lie in [0, vocab_size); counts the two reserved codes
    min_count: int | None = None
    hash_buckets: int | None = None
    bucketize: int | None = None  # a numeric column cut into quantile buckets
    boundaries: list[float] | None = None
    oov_rate_valid: float | None = None
    # numeric
    log1p: bool = False
    fill: float | None = None  # raw-unit fill for nulls; None: the train mean
    mean: float | None = None
    std: float | None = None
    # sequence (also uses vocab_size, min_count, hash_buckets, oov_rate_valid)
    max_len: int | None = None  # encoded as [max_len] int32 codes, the last max_len elements
    pooling: str | None = None  # "mean" | "sum" | "attention"
    share_with: str | None = None  # a categorical feature whose vocabulary (and embedding rows) it uses

    @property
    def transforms(self) -> str:
        """Short human description of what encoding does to the raw column."""
        if self.kind == "numeric":
            steps = ["log1p"] if self.log1p else []
            steps.append("fill " + ("train mean" if self.fill is None else f"{self.fill:g}"))
            steps.append("standardise")
            return ", ".join(steps)
        if self.kind == "sequence":
            source = (f"codes of {self.share_with}" if self.share_with
                      else f"hash into {self.hash_buckets:,} buckets" if self.hash_buckets
                      else "vocabulary" + (f", min count {self.min_count}" if (self.min_count or 1) > 1 else ""))
            return f"last {self.max_len}, {source}, {self.pooling} pooling"
        if self.hash_buckets:
            return f"hash into {self.hash_buckets:,} buckets"
        if self.bucketize:
            return f"{self.vocab_size - 2} quantile buckets"
        return "vocabulary" + (f", min count {self.min_count}" if self.min_count and self.min_count > 1 else "")

    def to_dict(self) -> dict:
        if self.kind == "numeric":
            keys = ("name", "kind", "dtype", "log1p", "fill", "mean", "std")
        elif self.kind == "sequence":
            keys = ("name", "kind", "dtype", "vocab_size", "min_count", "hash_buckets", "oov_rate_valid", "max_len",
                    "pooling", "share_with")
        else:
            keys = ("name", "kind", "dtype", "vocab_size", "min_count", "hash_buckets", "oov_rate_valid")
            if self.bucketize:
                keys += ("bucketize", "boundaries")
        values = asdict(self)
        return {k: values[k] for k in keys}

    @classmethod
    def from_dict(cls, data: dict) -> Feature:
        if not isinstance(data, dict) or "name" not in data or data.get("kind") not in KINDS:
            raise UserError(f"schema.json has a malformed feature entry {data!r}: re-run mtrec preprocess")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Schema:
    features: list[Feature]
    labels: list[str]
    positive_rate: dict[str, float] = field(default_factory=dict)
    user: str | None = None
    item: str | None = None
    time: str | None = None
    split: dict = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    version: int = VERSION

    @property
    def categorical_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def sequence_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "sequence"]

    @property
    def numeric_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "numeric"]

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """{flat categorical feature: vocab size} (sequences are in ``sequence_features``)."""
        return {f.name: f.vocab_size for f in self.categorical_features}

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": self.version, "features": [f.to_dict() for f in self.features],
                "labels": list(self.labels), "positive_rate": dict(self.positive_rate), "user": self.user,
                "item": self.item, "time": self.time, "split": dict(self.split), "rows": dict(self.rows)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "schema.json") -> Schema:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{where} was not made by mtrec preprocess: run mtrec preprocess first")
        version = data.get("version")
        if version != VERSION:
            raise UserError(f"{where} has data format version {version!r} but this mtrec reads version {VERSION}: "
                            "re-run mtrec preprocess with this mtrec")
        try:
            features = [Feature.from_dict(f) for f in data["features"]]
            labels = list(data["labels"])
        except (KeyError, TypeError) as err:
            raise UserError(f"{where} is incomplete (missing {err}): re-run mtrec preprocess") from err
        return cls(features=features, labels=labels, positive_rate=dict(data.get("positive_rate") or {}),
                   user=data.get("user"), item=data.get("item"), time=data.get("time"),
                   split=dict(data.get("split") or {}), rows=dict(data.get("rows") or {}), version=version)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read ``<dir>/schema.json`` (or the file itself when given a path ending in .json)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "schema.json"
        if not path.exists():
            raise UserError(f"{path} not found: pass a directory made by mtrec preprocess")
        if not file.is_file():
            raise UserError(f"{path} was not made by mtrec preprocess (no schema.json): run mtrec preprocess first")
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{file} is unreadable ({err}): re-run mtrec preprocess") from err
        return cls.from_dict(data, where=str(file))

    def save(self, path: str | Path) -> Path:
        """Write ``<dir>/schema.json`` atomically (temp file + rename)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "schema.json"
        atomic_write_text(file, json.dumps(self.to_dict(), indent=2) + "\n")
        return file
