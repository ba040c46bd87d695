"""Errors a user can act on.

Each carries a message written for the person at the terminal: what was wrong,
where, and how to fix it. The CLI prints these without a traceback and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class UserError(Exception):
    """Bad input from the user: config, data, paths. Printed without a traceback."""


class ConfigError(UserError):
    """The job config is invalid. Raised on the driver, before Ray starts."""


class DataError(UserError):
    """A dataset file or record is malformed; the message names the file and line/record."""


def request_problem(errors: Sequence[Mapping[str, Any]]) -> tuple[str | None, str]:
    """The parameter and the message of a request pydantic refused, from ``ValidationError.errors()``.

    A union field (``"auto"`` or an integer, a string or a list) fails once per branch, each location ending
    in the branch's tag (``literal['auto']``, ``constrained-int``); its branches are said together under the
    field's own name, so that the client reads what the field accepts rather than the first branch alone."""
    import re

    def field(loc: tuple) -> tuple:
        return tuple(p for p in loc if not re.fullmatch(r"[\w-]+\[.*\]|[a-z]+(-[a-z]+)+|int|float|str|bool",
                                                         str(p)))

    first = errors[0]
    where = field(first["loc"])
    said: list[str] = []
    for error in errors:
        if field(error["loc"]) == where:
            text = error["msg"].removeprefix("Value error, ")
            said.append(text if not said else text.removeprefix("Input should be "))
    param = ".".join(str(p) for p in where) or None
    message = " or ".join(dict.fromkeys(said))
    if first["type"] == "extra_forbidden":
        message = "not a parameter of this endpoint"
    return param, f"{param}: {message}" if param else message
