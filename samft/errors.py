"""User-facing errors.

Anything a user can cause (a bad path, key, value or file) raises :class:`SamftError` with a message
that names the offending thing and says what was expected. The CLI prints the message alone and exits
non-zero; library users catch it like any exception.
"""

from __future__ import annotations


class SamftError(Exception):
    """An error caused by user input (path, config key or value, data file, checkpoint)."""


class ConfigError(SamftError):
    """A config file, key or value is wrong."""


class DataError(SamftError):
    """A dataset file or layout is wrong."""


class CheckpointError(SamftError):
    """A checkpoint or adapter file does not match what is asked for."""
