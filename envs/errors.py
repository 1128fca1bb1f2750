"""The errors `run.py` reports in one line: a mistake in what the user asked for or pointed at. They live apart from
the modules that raise them, so that importing an env needs no torch."""


class UsageError(ValueError):
    """A bad option, config value, path or request; the message is one line that says what to change. Any other
    error is a bug and keeps its traceback."""


class DataError(UsageError):
    """Bad dataset on disk: message is ONE line that names the fix."""
