"""Exceptions for user-facing problems.

Every stage raises one of these for bad input; the command line prints the message as a single
line and exits non-zero. Programming errors stay ordinary exceptions with a traceback.
"""

__all__ = ["SrasegError", "DatasetError", "ConfigError", "WeightsError", "Preempted"]


class SrasegError(Exception):
    """A problem the user can fix: bad input, bad settings, missing files."""


class DatasetError(SrasegError):
    """A dataset on disk is missing, corrupt or inconsistent (names the file and the problem)."""


class ConfigError(SrasegError):
    """A setting has a value outside what the stage accepts (names the key and allowed values)."""


class WeightsError(SrasegError):
    """Model weights are missing or do not match the model."""


class Preempted(SrasegError):
    """The job was asked to stop (SIGTERM/SIGUSR1) and wrote its resume checkpoint; rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
