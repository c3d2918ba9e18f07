"""User-facing errors.

Raise :class:`AhpaError` for anything a user can fix (bad config key, missing
weights file, wrong array layout).  The ``ahpa`` command prints its message on
one line and exits with status 2, without a traceback.  The message must say
what was wrong and what to do about it.
"""


class AhpaError(Exception):
    """An error caused by user input, with a message that names the fix."""

    _WRAPPED = "ahpa.errors.AhpaError: "

    def __init__(self, message: str = "", *args):
        # torch's DataLoader re-raises a worker's exception as ExceptionType("Caught ... Original Traceback ...");
        # keep only the original message, so the CLI still prints one clear line.
        if isinstance(message, str) and message.startswith("Caught AhpaError") and self._WRAPPED in message:
            message = message.rsplit(self._WRAPPED, 1)[1].strip()
        super().__init__(message, *args)
