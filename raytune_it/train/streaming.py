"""A training split read from its Parquet files in storage as the epoch goes, for splits too large to hold.

The object store holds a split once per node; a split larger than it spills to disk, and a split larger
than a worker's memory cannot be taken whole. Such a split stays in storage (``data.streaming``): the
driver reads only the files' metadata (its memory stays flat however large the data), and each worker
reads the row groups its rows fall in, a window of them at a time, in the epoch's order (``epoch_rows``:
the row groups permuted, the rows shuffled within each window of ``data.shuffle_window_row_groups``).

A worker keeps at most two windows of row groups (a micro-batch can straddle two) and every row's length,
read once at start from the ``input_ids`` column alone: the lengths count each step's tokens and group
rows by length, and let a restart find its data position without reading what came before.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from raytune_it.storage import Location


@dataclass(frozen=True)
class StreamedSplit:
    files: tuple[Location, ...]
    #: (file index, row group in that file, rows) for every row group, in file order
    groups: tuple[tuple[int, int, int], ...]
    window: int

    @property
    def rows(self) -> int:
        return sum(rows for _, _, rows in self.groups)

    def reader(self) -> "StreamReader":
        return StreamReader(self)

    def describe(self) -> str:
        groups = len(self.groups)
        return f"streamed from storage ({groups} row group{'s' * (groups != 1)}, shuffled in windows of {self.window})"


def streamed_split(files: Sequence[Location], window: int) -> StreamedSplit:
    """The split's layout from the Parquet footers alone."""
    import pyarrow.parquet as pq

    groups = []
    for number, file in enumerate(files):
        with file.open_input_file() as handle:
            metadata = pq.ParquetFile(handle).metadata
        groups += [(number, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups)]
    return StreamedSplit(tuple(files), tuple(groups), window)


def split_bytes(files: Sequence[Location]) -> int:
    """The split's size in memory, as Arrow holds it: the uncompressed size of its row groups."""
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        with file.open_input_file() as handle:
            metadata = pq.ParquetFile(handle).metadata
        total += sum(metadata.row_group(group).total_byte_size for group in range(metadata.num_row_groups))
    return total


class StreamReader:
    """A worker's view of a ``StreamedSplit``: rows by index, read a row group at a time and kept for two
    windows (least recently used first out)."""

    def __init__(self, split: StreamedSplit) -> None:
        import numpy as np

        self.split = split
        self.group_rows = [rows for _, _, rows in split.groups]
        self.starts = np.concatenate([[0], np.cumsum(self.group_rows)]).astype(np.int64)
        self.capacity = 2 * split.window
        self.cache: OrderedDict[int, Any] = OrderedDict()
        self.reads = 0  # row groups read from storage, lengths aside
        self._files: dict[int, Any] = {}
        self.lengths = self._lengths()

    def _parquet(self, number: int) -> Any:
        import pyarrow.parquet as pq

        if number not in self._files:
            self._files[number] = pq.ParquetFile(self.split.files[number].open_input_file())
        return self._files[number]

    def _lengths(self) -> Any:
        import numpy as np
        import pyarrow.compute as pc

        parts = [pc.list_value_length(self._parquet(number).read_row_group(group, columns=["input_ids"])
                                      .column("input_ids")).to_numpy()
                 for number, group, _ in self.split.groups]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _group(self, index: int) -> Any:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        number, group, _ = self.split.groups[index]
        table = self._parquet(number).read_row_group(group)
        self.reads += 1
        self.cache[index] = table
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return table

    def take(self, indices: Sequence[int]) -> Any:
        import numpy as np
        import pyarrow as pa

        positions = np.asarray(indices, dtype=np.int64)
        groups = np.searchsorted(self.starts, positions, side="right") - 1
        needed = list(dict.fromkeys(groups.tolist()))  # in first-use order
        tables = [self._group(g) for g in needed]
        offsets = dict(zip(needed, np.cumsum([0] + [t.num_rows for t in tables[:-1]]).tolist()))
        local = positions - self.starts[groups] + np.array([offsets[g] for g in groups.tolist()], dtype=np.int64)
        return pa.concat_tables(tables).take(pa.array(local))
