"""A data file cut into chunks that separate processes read on their own, each record named as in the whole file.

JSON Lines is cut at line ends about every ``CHUNK_BYTES``; the driver finds the cuts and each chunk's first
line number in one sequential pass that only counts newlines (no JSON is parsed), so a bad record in any
chunk is named ``file:line`` exactly as reading the whole file names it. Parquet is cut at row groups, from
the footer alone. A JSON array cannot be cut without parsing it, so it is one chunk; write JSON Lines or
Parquet to prepare a large file in parallel.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

from raytune_it.data.records import FileType, jsonl_lines
from raytune_it.storage import Location

CHUNK_BYTES = 8 << 20
CHUNK_ROWS = 20_000
SCAN_BYTES = 16 << 20
#: The file types that can be cut: a JSON array is parsed from its start.
CHUNKED = ("jsonl", "parquet")


@dataclass(frozen=True)
class Chunk:
    """Records ``[start, end)`` of one file: bytes for JSON Lines, row groups for Parquet."""

    index: int
    source: str  #: data.path or data.eval_path as configured (a path, a URI or builtin:tasks)
    kind: FileType
    start: int
    end: int
    first_record: int  #: the line (JSON Lines) or record number (Parquet) the chunk starts at
    split: str | None = None  #: the split of every record of the file (an eval file), or None: by content


def plan_chunks(source: str, location: Location, kind: FileType, first_index: int = 0, split: str | None = None,
                chunk_bytes: int = CHUNK_BYTES, chunk_rows: int = CHUNK_ROWS) -> list[Chunk]:
    if kind not in CHUNKED:
        raise ValueError(f"{source}: a {kind} file is read whole, not in chunks")
    spans = _jsonl_spans(location, chunk_bytes) if kind == "jsonl" else _parquet_spans(location, chunk_rows)
    return [Chunk(first_index + n, source, kind, start, end, first, split)
            for n, (start, end, first) in enumerate(spans)]


def _jsonl_spans(location: Location, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Byte ranges ending at a line end, each at least ``chunk_bytes`` long (the last may be shorter), and the
    line number each starts on."""
    spans, start, first_line = [], 0, 1
    offset, newlines = 0, 0  # bytes and newlines before the current block
    with location.filesystem.open_input_stream(location.path) as stream:
        while block := stream.read(SCAN_BYTES):
            search = 0
            while start + chunk_bytes - offset < len(block):
                index = block.find(b"\n", max(start + chunk_bytes - offset, search))
                if index < 0:
                    break
                end = offset + index + 1
                spans.append((start, end, first_line))
                start, first_line, search = end, newlines + block.count(b"\n", 0, index + 1) + 1, index + 1
            offset += len(block)
            newlines += block.count(b"\n")
    if offset > start or not spans:
        spans.append((start, offset, first_line))
    return spans


def _parquet_spans(location: Location, chunk_rows: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    with location.open_input_file() as handle:
        metadata = pq.ParquetFile(handle).metadata
    spans, start, rows, first = [], 0, 0, 1
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        if rows >= chunk_rows or group == metadata.num_row_groups - 1:
            spans.append((start, group + 1, first))
            start, first, rows = group + 1, first + rows, 0
    return spans or [(0, 0, 1)]


def chunk_records(chunk: Chunk, location: Location, name: str) -> Iterator[tuple[str, Any]]:
    """The chunk's records as ``(where, record or ValueError)``, named as reading all of ``name`` names them."""
    if chunk.kind == "jsonl":
        with location.open_input_file() as handle:
            handle.seek(chunk.start)
            data = handle.read(chunk.end - chunk.start)
        yield from jsonl_lines(io.BytesIO(data), name, chunk.first_record)
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        with location.open_input_file() as handle:
            number = chunk.first_record
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=2048,
                                                             row_groups=range(chunk.start, chunk.end)):
                for row in batch.to_pylist():
                    yield f"{name}: record {number}", row
                    number += 1
    else:
        raise ValueError(f"{name}: a {chunk.kind} file is read whole, not in chunks")
