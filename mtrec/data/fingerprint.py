"""A content fingerprint of an encoder: what turns raw values into codes and standardised numbers.

The fingerprint is a SHA-256 over (1) every feature's encoding settings in ``schema.json``
(name, kind, raw dtype, vocabulary size, min count, hash buckets, quantile boundaries, log1p,
fill, mean, std, max_len, share_with) and (2) the bytes of every vocabulary file the encoder
reads, streamed 1 MiB at a time (a 10M-id vocabulary is ~100 MB: ~0.2 s on one core). Two data
directories with the same fingerprint encode every raw row to the same codes and numbers; a
re-preprocessed folder (another seed, split or log) has another one. Statistics of the
validation split (``oov_rate_valid``) and the model's choices (``pooling``) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mtrec.core.errors import UserError
from mtrec.data.encode import uses_vocab, vocab_path
from mtrec.data.schema import Schema

_ENCODING_KEYS = ("name", "kind", "dtype", "vocab_size", "min_count", "hash_buckets", "bucketize", "boundaries",
                  "log1p", "fill", "mean", "std", "max_len", "share_with")
_BLOCK = 1 << 20


def vocab_files(schema: Schema, vocab_dir: str | Path) -> list[Path]:
    """The vocabulary files ``encode`` reads for this schema, in feature order."""
    return [vocab_path(vocab_dir, f.name) for f in schema.features if uses_vocab(f)]


def encoder_fingerprint(schema: Schema, vocab_dir: str | Path) -> str:
    """``sha256:<hex>`` of the schema's encoding settings and its vocabulary files' bytes."""
    digest = hashlib.sha256()
    settings = [{k: getattr(f, k) for k in _ENCODING_KEYS} for f in schema.features]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in vocab_files(schema, vocab_dir):
        digest.update(b"\0" + path.name.encode() + b"\0")
        try:
            with path.open("rb") as handle:
                while block := handle.read(_BLOCK):
                    digest.update(block)
        except OSError as err:
            raise UserError(f"vocabulary {path} is unreadable ({err.strerror}): the directory is incomplete, "
                            "re-run mtrec preprocess (or train again)") from err
    return "sha256:" + digest.hexdigest()
