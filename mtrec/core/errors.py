"""The one exception type for user mistakes.

Raised anywhere (data, models, balancers, engine); the CLI turns it into a single line on stderr
and exit code 2. The message names the problem and, where there is one, the fix.
"""


class UserError(Exception):
    """A mistake in the user's input or configuration (not a bug in mtrec)."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved after the current step (the CLI exits 130).

    Here, not in ``mtrec.engine.loop``, so that the CLI can catch it without importing torch for every
    command (``synth`` and ``preprocess`` stay torch-free)."""

    def __init__(self, run_dir):
        super().__init__(str(run_dir))
        self.run_dir = run_dir
