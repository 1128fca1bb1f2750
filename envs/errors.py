"""The error for bad data on disk, apart from the modules that read it, so that importing an env needs no torch."""


class DataError(ValueError):
    """Bad dataset on disk: message is ONE line that names the fix."""
