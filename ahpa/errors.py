"""User-facing errors.

Raise :class:`AhpaError` for anything a user can fix (bad config key, missing
weights file, wrong array layout).  The ``ahpa`` command prints its message on
one line and exits with status 2, without a traceback.  The message must say
what was wrong and what to do about it.
"""


class AhpaError(Exception):
    """An error caused by user input, with a message that names the fix."""
