"""User-facing errors.

Raise :class:`AhpaError` for anything a user can fix (bad config key, missing
weights file, wrong array layout).  The ``ahpa`` command prints its message on
one line and exits with status 2, without a traceback.  The message must say
what was wrong and what to do about it.
"""

import errno


class AhpaError(Exception):
    """An error caused by user input, with a message that names the fix."""

    _WRAPPED = "ahpa.errors.AhpaError: "

    def __init__(self, message: str = "", *args):
        # torch's DataLoader re-raises a worker's exception as ExceptionType("Caught ... Original Traceback ...");
        # keep only the original message, so the CLI still prints one clear line.
        if isinstance(message, str) and message.startswith("Caught AhpaError") and self._WRAPPED in message:
            message = message.rsplit(self._WRAPPED, 1)[1].strip()
        super().__init__(message, *args)


# A full disk (or an exhausted quota) met while writing, in any library's error type: an OSError carries its
# errno; others (safetensors' SafetensorError, torch's RuntimeError from its zip writer, numpy's) only the
# operating system's message, somewhere in the exception chain.  The one place that recognises it.
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException | None) -> str | None:
    """"No space left on device" (or "Disk quota exceeded") when ``err`` or an exception in its chain
    (``__cause__`` / ``__context__``) is a full disk or quota, else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL_MESSAGES[err.errno == errno.EDQUOT]
        text = str(err)
        for message in DISK_FULL_MESSAGES:
            if message in text:
                return message
        err = err.__cause__ or err.__context__
    return None
