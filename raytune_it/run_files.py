"""Reading the JSON files a run wrote (summary.json, serve.json, eval.json, ...) for the commands that read
them back: ``report`` and ``plan --calibrate``. A file that was edited, truncated or half-copied, or written by
another version, is one UserError naming the file and what it lacks, never a KeyError traceback."""

from __future__ import annotations

import json
from typing import Any

from raytune_it.errors import UserError
from raytune_it.storage import Location, redact_uri


class RunFileObject(dict):
    """A JSON object of a run file that, asked for a key it lacks, names the file and the key."""

    source = ""
    hint = ""

    def __missing__(self, key: str) -> Any:
        raise UserError(f"{self.source}: no {key!r}; {self.hint}")

    def positive_number(self, key: str) -> float:
        value = self[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"{self.source}: {key} is {value!r}, not a positive number; {self.hint}")
        return float(value)


def read_json_object(file: Location, hint: str) -> RunFileObject:
    """The file's JSON object; ``hint`` says what to do when it is damaged (ends every message)."""
    source = redact_uri(file.uri)

    def as_object(pairs: list[tuple[str, Any]]) -> RunFileObject:
        value = RunFileObject(pairs)
        value.source, value.hint = source, hint
        return value

    try:
        value = json.loads(file.read_text(), object_pairs_hook=as_object)
    except FileNotFoundError:
        raise UserError(f"{source}: missing; {hint}") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read it ({exc.strerror or exc}); {hint}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{source}: not valid JSON ({exc}); {hint}") from None
    if not isinstance(value, RunFileObject):
        kind = {list: "an array", str: "a string", type(None): "null"}.get(type(value), "a number")
        raise UserError(f"{source}: holds {kind}, not a JSON object; {hint}")
    return value
