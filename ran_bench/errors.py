"""The base of every error that is the user's input to fix (a config key, a file, a flag).

`ran-bench` prints such an error as one line, `error: <message>`, and exits with status 2 instead
of a traceback; each module's own error class (ConfigError, CheckpointError, ...) derives from it.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class InputError(UserError, ValueError):
    """A bad value (a flag, a file's contents) where no module-specific class is needed; also a
    ValueError, so library callers that catch ValueError keep working."""


class StorageError(UserError, OSError):
    """A file or folder that cannot be written: a read-only or full file system, no permission, a
    file where a folder should be. Also an OSError, so callers that catch OSError keep working."""


def os_error_text(error: OSError) -> str:
    """An OSError's cause in words ("No space left on device"), without Python's decoration."""
    return error.strerror or str(error)
