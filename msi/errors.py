"""Errors that the command-line tools report as one line, without a traceback."""


class MSIError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(MSIError):
    """A configuration file or override is wrong: an unknown key, a bad value."""


class DataError(MSIError):
    """A data file is missing or malformed. The message names the file (and line where there is one)."""


class CheckpointError(MSIError):
    """A checkpoint is missing, truncated, unsafe, or belongs to another data set."""
