"""The engine: building a run from its config (``build``), the step (per-task gradients, the
balancer, the write-back), the loop and its run directory, optimizers, learning-rate schedules, the
objective, checkpoints, diagnostics and TensorBoard events, torchrun. May import metrics, models,
balancers, data and core; never parses flags and never imports serving, research or the CLI."""
