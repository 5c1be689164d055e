"""Errors a user can cause.

The CLI prints a :class:`UserError` as one line on stderr and exits with code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user asked for (a missing file, an unknown name, a bad value)."""
