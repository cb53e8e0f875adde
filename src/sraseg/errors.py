"""Exceptions for user-facing problems.

Every stage raises one of these for bad input; the command line prints the message as a single
line and exits non-zero. Programming errors stay ordinary exceptions with a traceback.
"""

__all__ = ["SrasegError", "DatasetError", "ConfigError", "WeightsError"]


class SrasegError(Exception):
    """A problem the user can fix: bad input, bad settings, missing files."""


class DatasetError(SrasegError):
    """A dataset on disk is missing, corrupt or inconsistent (names the file and the problem)."""


class ConfigError(SrasegError):
    """A setting has a value outside what the stage accepts (names the key and allowed values)."""


class WeightsError(SrasegError):
    """Model weights are missing or do not match the model."""
