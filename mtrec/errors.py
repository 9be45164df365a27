"""The one exception type for user mistakes.

Raised anywhere (data, models, balancers, engine); the CLI turns it into a single line on stderr
and exit code 2. The message names the problem and, where there is one, the fix.
"""


class UserError(Exception):
    """A mistake in the user's input or configuration (not a bug in mtrec)."""
