"""The data layer: raw Parquet logs -> encoded splits, and encoded splits -> tensors.

- ``schema``: ``Schema`` / ``Feature``, the ``schema.json`` of an encoded directory.
- ``preprocess``: ``preprocess(...)`` (split, fit on train, encode, write atomically).
- ``encode``: ``encode(frame, schema, vocab_dir)`` and ``read_raw(path)`` (evaluate --raw).
- ``spec``: the TOML feature spec. ``synth``: synthetic interaction logs.
- ``tensors``: encoded Parquet -> torch (the only module here that imports torch).

Beside models and balancers, above the core: imports ``mtrec.core`` only. Nothing in this
package except ``tensors`` and ``stream`` imports torch. Decisions: docs/data.md; output format:
docs/data-format.md.
"""
