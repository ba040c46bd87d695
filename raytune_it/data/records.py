"""Reading records (Alpaca, conversations, plain prompts: ``data.format``) from JSON, JSONL or Parquet.

Files stream: a JSON array is parsed incrementally (ijson), JSONL line by line and
Parquet batch by batch (pyarrow), so a file of hundreds of thousands of records
never sits whole in one process. Every bad record is reported with its file and
line (JSONL) or record number (JSON, Parquet); with ``skip_bad_records`` it is
counted and skipped instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from raytune_it.errors import DataError

FileType = Literal["json", "jsonl", "parquet"]
REQUIRED_TEXT = ("instruction", "output")
#: How many skipped-record reasons are kept for display; the count is exact.
KEEP_REASONS = 20
#: How deep a record's objects and arrays may nest. A conversation with tool schemas nests about 10 levels;
#: past this a record is bad, so that no record costs more than its size to read or recurses through
#: what reads it later (json.dumps, templates).
MAX_NESTING = 64


@dataclass
class ReadReport:
    """What reading a file found: good records, and the bad ones skipped."""

    records: int = 0
    bad_records: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.bad_records += 1
        if len(self.reasons) < KEEP_REASONS:
            self.reasons.append(reason)


def file_type_by_name(name: str) -> FileType | None:
    """The file type a name's suffix decides, or None for ``.json`` and others (the content decides)."""
    from raytune_it.config.paths import SUFFIX_TYPES

    kind = SUFFIX_TYPES.get(Path(name).suffix.lower())
    return kind if kind in ("jsonl", "parquet") else None  # type: ignore[return-value]


def detect_file_type(path: Path) -> FileType:
    by_name = file_type_by_name(str(path))
    if by_name is not None:
        return by_name
    suffix = path.suffix.lower()
    if suffix == ".json":
        with path.open("rb") as handle:
            first_line = handle.readline(1 << 20).removeprefix(BOM).strip()
        # JSON Lines named .json: a first line that is a whole object. A pretty-printed object is not (and
        # the JSON reader then says that a .json file must be an array).
        if first_line.startswith(b"{"):
            try:
                json.loads(first_line)
                return "jsonl"
            except (ValueError, RecursionError):
                pass
        return "json"
    raise DataError(f"{path}: cannot tell the file type from the name; use .json, .jsonl or .parquet, "
                    "or set data.file_type")


def validate_record(raw: Any, answers_required: bool = True) -> dict[str, Any]:
    """Check one record and normalise it; raises ValueError with the reason. A prompt for generation
    (``answers_required=False``) may have no output."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with instruction/input/output, got {type(raw).__name__}")
    record = dict(raw)
    if not answers_required and record.get("output") is None:
        record["output"] = ""
    for name in REQUIRED_TEXT:
        if name not in record or record[name] is None:
            raise ValueError(f"missing field {name!r}")
        if not isinstance(record[name], str):
            raise ValueError(f"field {name!r} must be a string, got {type(record[name]).__name__}")
    if answers_required and not record["output"].strip():
        raise ValueError("field 'output' is empty: there is nothing to train on")
    if not record["instruction"].strip():
        raise ValueError("field 'instruction' is empty")
    value = record.get("input")
    if value is None:
        record["input"] = ""
    elif not isinstance(value, str):
        raise ValueError(f"field 'input' must be a string, got {type(value).__name__}")
    return record


#: Windows tools start UTF-8 text with a byte-order mark; it is not part of the data.
BOM = b"\xef\xbb\xbf"


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        yield from jsonl_lines(handle, str(path), 1)


def jsonl_lines(lines: Iterable[bytes], name: str, first_line: int) -> Iterator[tuple[str, Any]]:
    """Each line of JSON Lines as ``(where, record or ValueError)``: a whole file from line 1, or a byte
    range of it that starts on line ``first_line`` (``data/chunks.py``), numbered as the whole file is."""
    for number, line in enumerate(lines, start=first_line):
        where = f"{name}:{number}"
        if number == 1:
            line = line.removeprefix(BOM)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield where, ValueError(f"invalid UTF-8 at byte {exc.start} of the line")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield where, ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:  # past the interpreter's own limit, about 1,000 levels
            yield where, too_deep()
            continue
        yield where, too_deep() if nests_too_deep(line, record) else record


def nests_too_deep(raw: bytes, value: Any) -> bool:
    """Whether ``value``, parsed from ``raw``, nests past ``MAX_NESTING``. JSON with fewer brackets than the
    limit cannot, so the walk is only for the rare rest: ordinary records cost two byte counts."""
    return raw.count(b"[") + raw.count(b"{") > MAX_NESTING and nesting(value) > MAX_NESTING


def nesting(value: Any) -> int:
    """How deep ``value``'s objects and arrays nest (a flat record is 1; a scalar 0), walked without
    recursion and given up just past ``MAX_NESTING``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_NESTING:
                break
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def too_deep() -> ValueError:
    return ValueError(f"objects and arrays nest deeper than {MAX_NESTING} levels; no record format needs that")


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    import ijson

    index = 0
    with path.open("rb") as handle:
        if handle.read(len(BOM)) != BOM:
            handle.seek(0)
        first = _first_character(handle)
        if first != b"[":
            start = first.decode("utf-8", "replace")
            what = {b"{": "an object", b"": "empty"}.get(first, f"text starting with {start!r}")
            raise DataError(f"{path}: a .json file must be one array of records ([{{...}}, {{...}}]), but it is "
                            f"{what}. Put the records in an array, or write one record per line as .jsonl.")
        try:
            for index, item in enumerate(_array_items(ijson.basic_parse(handle, use_float=True)), start=1):
                yield f"{path}: record {index}", item
        except ijson.JSONError as exc:
            detail = exc.args[0].decode("utf-8", "replace") if isinstance(exc.args[0], bytes) else str(exc)
            detail = detail.strip().splitlines()[0]
            raise DataError(f"{path}: record {index + 1}: the file is not valid JSON ({detail}). "
                            f"The {index} records before it were read; fix or truncate the file there. "
                            "A JSON file must be one array of objects; use .jsonl for one object per line.") from None


_OPEN, _CLOSE = ("start_map", "start_array"), ("end_map", "end_array")


def _array_items(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
    """The items of a top-level JSON array from ijson's ``basic_parse`` events, each item built as
    ``ijson.items`` builds it, or ``too_deep()`` for one that nests past ``MAX_NESTING`` (its events are
    passed over, not built).

    Not ``ijson.items``: its events carry the path from the root (``item.item.item...``), which grows with
    the depth, so an upload of a few MB of ``[[[[...`` would take the replica minutes. Here each event costs
    the same at any depth, and the reader goes on to the next record."""
    from ijson.common import ObjectBuilder

    depth, builder, skipping = 0, None, False
    for event, value in events:
        if event in _OPEN:
            depth += 1
            if depth == 1:  # the array itself
                continue
            skipping = skipping or depth > MAX_NESTING + 1
        elif event in _CLOSE:
            depth -= 1
            if depth == 0:  # the array's end (the parser still checks that nothing follows)
                continue
        elif depth == 1:  # a scalar item
            yield value
            continue
        if not skipping:
            builder = builder or ObjectBuilder()
            builder.event(event, value)
        if depth == 1:  # the item's own object or array closed
            yield too_deep() if skipping else builder.value  # type: ignore[union-attr]
            builder, skipping = None, False


def _first_character(handle: Any) -> bytes:
    """The first non-blank byte of a file, leaving the handle where it was."""
    start = handle.tell()
    head = handle.read(4096).lstrip(b" \t\r\n")
    handle.seek(start)
    return head[:1]


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt footer
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}: record {index}", row


def prompt_record(raw: Any) -> dict[str, Any]:
    """``{"prompt": text}``: a plain prompt for ``raytune-it generate``, sent as it is."""
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
        raise ValueError("expected an object with a non-empty string 'prompt'")
    return dict(raw)


def validator(record_format: str, answers_required: bool = True) -> Any:
    """The check that turns a raw record of ``data.format`` into a record (ValueError: why not): a training
    record, or with ``answers_required=False`` a prompt to generate from (no answer needed)."""
    from functools import partial

    from raytune_it.data.chat import messages_record, sharegpt_record

    if record_format == "prompt":
        if answers_required:
            raise ValueError("data.format=prompt has no answers to train on")
        return prompt_record
    check = {"alpaca": validate_record, "messages": messages_record, "sharegpt": sharegpt_record}[record_format]
    return check if answers_required else partial(check, **{
        "answers_required" if record_format == "alpaca" else "ends_on_answer": False})


#: The key that tells a record's format, in the order they are tried.
FORMAT_KEYS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"))


def detect_record_format(path: Path, file_type: FileType) -> str:
    """``data.format`` of a file, from its first record's keys (messages, conversations or instruction)."""
    reader = {"json": _json_array, "jsonl": _jsonl, "parquet": _parquet}[file_type]
    for where, raw in reader(path):
        if isinstance(raw, Exception):
            raise DataError(f"{where}: {raw}")
        for key, record_format in FORMAT_KEYS:
            if isinstance(raw, dict) and key in raw:
                return record_format
        raise DataError(f"{where}: the record is in no format raytune-it reads: OpenAI's chat format "
                        "({messages: [...]}), ShareGPT ({conversations: [...]}) or Alpaca ({instruction, input, "
                        "output})")
    raise DataError(f"{path}: the file holds no records")


def iter_records(
    paths: str | Path | Sequence[str | Path],
    file_type: Literal["auto", "json", "jsonl", "parquet"] = "auto",
    *,
    skip_bad_records: bool = False,
    report: ReadReport | None = None,
    limit: int | None = None,
    record_format: str = "alpaca",
    answers_required: bool = True,
    required_field: str | None = None,
    section: str = "data",
    purpose: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield validated records of a file, or of a folder's shards one after another (``config.paths.
    data_files``); raise DataError on the first bad one unless skipping. ``required_field`` (eval's family
    field) must be a non-empty string or number in every record. ``limit`` counts over all the files.
    ``section`` is the config section the file came from (``data``, ``eval.data``), so that a message names
    the key its reader can set; ``purpose`` is what the records are for, in words."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
    report = report if report is not None else ReadReport()
    check = validator(record_format, answers_required)
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        kind: FileType = detect_file_type(path) if file_type == "auto" else file_type
        reader = {"json": _json_array, "jsonl": _jsonl, "parquet": _parquet}[kind]
        yield from checked_records(reader(path), check, skip_bad_records=skip_bad_records, report=report,
                                   limit=limit, required_field=required_field, section=section)
        if limit is not None and report.records >= limit:
            break
    check_some_read(files_name(files), report, purpose or ("train on" if answers_required else "generate from"),
                    section)


def files_name(files: Sequence[Path]) -> str:
    """How a message names what was read: the file, or a folder's shards."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent} ({len(files)} files, {files[0].name} to {files[-1].name})"


def checked_records(raw_records: Iterable[tuple[str, Any]], check: Any, *, skip_bad_records: bool,
                    report: ReadReport, limit: int | None = None, required_field: str | None = None,
                    section: str = "data") -> Iterator[dict[str, Any]]:
    """The records that pass ``check`` (``validator``); the first bad one raises DataError naming where it is,
    unless skipping, when it is counted in ``report``. The one rule for a whole file and for a chunk of it."""
    for where, raw in raw_records:
        try:
            if isinstance(raw, Exception):
                raise raw
            record = check(raw)
            if required_field is not None:
                value = record.get(required_field)
                if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                    raise ValueError(f"field {required_field!r} (eval.family_field) is missing or not a name")
                record[required_field] = str(value)
        except ValueError as exc:
            if not skip_bad_records:
                raise DataError(f"{where}: {exc}. Fix the record, or set {section}.skip_bad_records=true "
                                "to skip and count bad records.") from None
            report.skip(f"{where}: {exc}")
            continue
        report.records += 1
        yield record
        if limit is not None and report.records >= limit:
            return


def check_some_read(name: str, report: ReadReport, purpose: str = "train on", section: str = "data") -> None:
    """A file that gave no record at all is an error: there is nothing to train on or generate from."""
    if report.records == 0:
        if report.bad_records:
            raise DataError(f"{name}: no usable record: all {report.bad_records} were bad and skipped "
                            f"({section}.skip_bad_records=true), the first: {report.reasons[0]}. "
                            "Fix the records; there is nothing to read.")
        raise DataError(f"{name}: the file holds no records; there is nothing to {purpose}.")
