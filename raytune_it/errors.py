"""Errors a user can act on.

Each carries a message written for the person at the terminal: what was wrong,
where, and how to fix it. The CLI prints these without a traceback and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, data, paths. Printed without a traceback."""


class ConfigError(UserError):
    """The job config is invalid. Raised on the driver, before Ray starts."""


class DataError(UserError):
    """A dataset file or record is malformed; the message names the file and line/record."""
