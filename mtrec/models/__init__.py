"""Models: ``build(name, ...)`` returns a network with ``model(codes, numeric) -> logits [B, T]``
(``codes``: the categorical fields, then each sequence's element columns).

Beside data and balancers, above the core: imports ``mtrec.core`` only."""

from __future__ import annotations

from mtrec.core.errors import UserError
from mtrec.models.multitask import ARCHITECTURES, ModelConfig, MultiTaskModel, SingleTask
from mtrec.models.sequence import POOLINGS, SequenceField

__all__ = ["ARCHITECTURES", "ModelConfig", "MultiTaskModel", "POOLINGS", "SequenceField", "SingleTask", "build",
           "names"]


def names() -> list[str]:
    return list(ARCHITECTURES)


def build(name: str, vocab_sizes: list[int], num_numeric: int, positive_rates: list[float],
          cfg: ModelConfig | None = None, sequences: list[SequenceField] = ()):
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    cfg = cfg or ModelConfig()
    if name == "ple" and cfg.levels < 1:
        raise UserError("--levels must be at least 1 for ple (1 = CGC)")
    return ARCHITECTURES[name](vocab_sizes, num_numeric, positive_rates, cfg, list(sequences))
