"""mtrec: multi-task CTR / recommendation training with gradient balancers."""

__version__ = "0.1.0"
