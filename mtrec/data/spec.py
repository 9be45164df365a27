"""The TOML feature spec: per-column overrides of the inferred feature kinds and transforms.

```toml
[features.user_id]
min_count = 2            # rarer values encode as OOV (overrides --min-count)

[features.device_fingerprint]
hash_buckets = 100000    # code = 2 + hash(value) % buckets, no vocabulary

[features.item_price]
kind = "numeric"
log1p = true             # sign(x) * log1p(|x|) before standardising
fill = 0.0               # nulls become this raw value (default: the train mean)

[features.age]
bucketize = 10           # quantile buckets fitted on train -> a categorical feature

[features.row_id]
kind = "drop"            # not a feature

[features.hist_items]
kind = "sequence"        # a list column (inferred for list<string|integer>)
max_len = 50             # keep the last 50 elements
pooling = "attention"    # mean | sum | attention (DIN target attention, needs share_with)
share_with = "item_id"   # the item column's vocabulary and embedding rows
```

Full description in docs/data.md. Every mistake (unknown key, wrong type, an option that does not
fit the kind) is a ``UserError`` naming the column and the key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mtrec.core.errors import UserError

SPEC_KINDS = ("categorical", "numeric", "sequence", "drop")
POOLINGS = ("mean", "sum", "attention")
DEFAULT_MAX_LEN, DEFAULT_POOLING = 50, "mean"
MAX_HASH_BUCKETS = 2**31 - 3  # codes 2 + bucket must fit in int32
_OPTIONS = {"kind": str, "min_count": int, "hash_buckets": int, "log1p": bool, "fill": float, "bucketize": int,
            "max_len": int, "pooling": str, "share_with": str}
_SEQUENCE_ONLY = ("max_len", "pooling", "share_with")
_NUMERIC_ONLY = ("log1p", "fill", "bucketize")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str | None = None  # None: inferred from the column's dtype
    min_count: int | None = None
    hash_buckets: int | None = None
    log1p: bool | None = None
    fill: float | None = None
    bucketize: int | None = None
    max_len: int | None = None
    pooling: str | None = None
    share_with: str | None = None

    def _set(self, keys) -> list[str]:
        return [k for k in keys if getattr(self, k) is not None]

    def check_kind(self, kind: str, where: str) -> None:
        """Raise when an option does not apply to the feature's (declared or inferred) kind."""
        categorical_only = self._set(("min_count", "hash_buckets"))
        numeric_only, sequence_only = self._set(_NUMERIC_ONLY), self._set(_SEQUENCE_ONLY)
        if kind == "numeric" and categorical_only:
            raise UserError(f"{where}: {categorical_only[0]} applies to categorical features but {self.name!r} is "
                            "numeric: remove it or set kind = \"categorical\"")
        if kind in ("categorical", "sequence") and numeric_only:
            raise UserError(f"{where}: {numeric_only[0]} applies to numeric features but {self.name!r} is "
                            f"{kind}: remove it or set kind = \"numeric\"")
        if kind != "sequence" and sequence_only:
            raise UserError(f"{where}: {sequence_only[0]} applies to sequence (list) features but {self.name!r} is "
                            f"{kind}: remove it, or set kind = \"sequence\" on a list column")
        if kind == "sequence":
            self._check_sequence(where)

    def _check_sequence(self, where: str) -> None:
        if self.pooling == "attention" and not self.share_with:
            raise UserError(f"{where}: [features.{self.name}] pooling = \"attention\" attends from the target item: "
                            "set share_with = \"<item column>\" (or use mean / sum pooling)")
        if self.share_with and self._set(("min_count", "hash_buckets")):
            raise UserError(f"{where}: [features.{self.name}] shares the codes of {self.share_with!r}, so its own "
                            f"{self._set(('min_count', 'hash_buckets'))[0]} means nothing: set it on "
                            f"[features.{self.share_with}] instead")
        if self.share_with == self.name:
            raise UserError(f"{where}: [features.{self.name}] share_with names the column itself: name the "
                            "categorical id column whose vocabulary it should use")


def _value(where: str, name: str, key: str, value):
    expected = _OPTIONS[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{where}: [features.{name}] {key} must be a {expected.__name__}, got {value!r}")
    if key == "kind" and value not in SPEC_KINDS:
        raise UserError(f"{where}: [features.{name}] kind must be one of {', '.join(SPEC_KINDS)}, got {value!r}")
    if key in ("min_count", "hash_buckets") and value < 1:
        raise UserError(f"{where}: [features.{name}] {key} must be at least 1, got {value}")
    if key == "hash_buckets" and value > MAX_HASH_BUCKETS:
        raise UserError(f"{where}: [features.{name}] hash_buckets must be at most {MAX_HASH_BUCKETS:,} "
                        "(codes are int32)")
    if key == "bucketize" and value < 2:
        raise UserError(f"{where}: [features.{name}] bucketize must be at least 2 buckets, got {value}")
    if key == "fill" and not math.isfinite(value):  # inf / nan would make every step non-finite
        raise UserError(f"{where}: [features.{name}] fill must be a finite number, got {value!r}")
    if key == "max_len" and value < 1:
        raise UserError(f"{where}: [features.{name}] max_len must be at least 1, got {value}")
    if key == "pooling" and value not in POOLINGS:
        raise UserError(f"{where}: [features.{name}] pooling must be one of {', '.join(POOLINGS)}, got {value!r}")
    return value


def parse_spec(data: dict, where: str = "spec") -> dict[str, ColumnSpec]:
    unknown = set(data) - {"features"}
    if unknown:
        raise UserError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}: only [features.<column>] "
                        "tables are allowed (see docs/data.md)")
    features = data.get("features", {})
    if not isinstance(features, dict):
        raise UserError(f"{where}: 'features' must be a table of [features.<column>] tables")
    specs = {}
    for name, options in features.items():
        if not isinstance(options, dict):
            raise UserError(f"{where}: [features.{name}] must be a table like kind = \"numeric\"")
        bad = set(options) - set(_OPTIONS)
        if bad:
            raise UserError(f"{where}: [features.{name}] has unknown key(s) {', '.join(sorted(bad))}; "
                            f"known keys: {', '.join(_OPTIONS)}")
        values = {key: _value(where, name, key, value) for key, value in options.items()}
        spec = ColumnSpec(name=name, **values)
        if spec.kind == "drop" and len(values) > 1:
            raise UserError(f"{where}: [features.{name}] is dropped, so its other keys mean nothing: remove them")
        if spec.hash_buckets is not None and spec.min_count is not None:
            raise UserError(f"{where}: [features.{name}] sets both hash_buckets and min_count: hashed features "
                            "have no vocabulary, keep one of the two")
        if spec.bucketize is not None and spec.kind == "categorical":
            raise UserError(f"{where}: [features.{name}] bucketize cuts a numeric column: drop kind = "
                            "\"categorical\" (the buckets become a categorical feature)")
        if spec.kind in ("categorical", "numeric", "sequence"):
            spec.check_kind(spec.kind, where)
        specs[name] = spec
    return specs


def load_spec(path: str | Path) -> dict[str, ColumnSpec]:
    """Read a TOML feature spec; ``{column: ColumnSpec}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"feature spec {path} not found: check the --spec path")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"feature spec {path} is not valid TOML ({err}): fix the file") from err
    return parse_spec(data, where=str(path))
