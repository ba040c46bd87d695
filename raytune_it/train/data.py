"""The training data: tokenized once, handed to the workers through Ray's object store or read from storage.

The driver streams the records through the foundation pipeline (template,
masking, truncation, packing, split) and writes the examples to Parquet, once
per dataset, on whatever storage holds the runs (``prepared.py``: shared by every
run of the same data, and a resumed run trains on exactly the same examples). For training the driver puts each
split in the object store (``SplitBlocks``), or, for a training split larger than a share of the object store,
hands the workers its files to read row groups from as they go (``streaming.StreamedSplit``). Every worker
reads its share of an epoch in that epoch's seeded order (``epoch_rows``), as torch's ``DistributedSampler``
does: a sorted or concatenated dataset is mixed from the first step, every epoch differs, and a restart
recomputes the order and continues at its data position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from raytune_it.data.tokenize import collate_arrow
from raytune_it.storage import Location

BLOCK_ROWS = 4096


def write_examples(examples: Iterator[dict], target: Location, packed: bool) -> int:
    """Write tokenized examples to one Parquet file (``ExampleWriter``), even with none; the rows written."""
    from itertools import islice

    writer = ExampleWriter(target, packed)
    writer.open()
    try:
        while chunk := list(islice(examples, BLOCK_ROWS)):
            writer.write(chunk)
    finally:
        writer.close()
    return writer.rows


class ExampleWriter:
    """Tokenized examples into one Parquet file, fed a batch at a time, in row groups of ``BLOCK_ROWS``: the
    blocks ``put_split`` puts in the object store. The one layout of a prepared split, whoever tokenized it
    (the driver, a Ray Data actor, the packing pass). The file is opened at the first row (or by ``open``),
    so a split a chunk has no rows of leaves no file; on an object store it appears only at ``close`` (one
    multipart upload). At most a row group is held, so a writer's memory does not grow with its file."""

    def __init__(self, target: Location, packed: bool) -> None:
        import pyarrow as pa

        columns = ["input_ids", "labels"] + (["position_ids"] if packed else [])
        self.schema = pa.schema([(name, pa.list_(pa.int32())) for name in columns])
        self.target, self.rows = target, 0
        self._pending: list[dict] = []
        self._sink: Any = None
        self._writer: Any = None

    def open(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._sink = self.target.open_output_stream()
            self._writer = pq.ParquetWriter(self._sink, self.schema)

    def write(self, examples: list[dict]) -> None:
        self._pending += examples
        while len(self._pending) >= BLOCK_ROWS:
            self._flush(self._pending[:BLOCK_ROWS])
            del self._pending[:BLOCK_ROWS]

    def close(self) -> None:
        if self._pending:
            self._flush(self._pending)
            self._pending = []
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def _flush(self, rows: list[dict]) -> None:
        import pyarrow as pa

        self.open()
        self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        self.rows += len(rows)


@dataclass(frozen=True)
class SplitBlocks:
    """A tokenized split in Ray's object store: Arrow tables of ``BLOCK_ROWS`` rows, put by the driver.

    Workers fetch the blocks (zero-copy from their node's shared memory, and a node fetches each block
    once for all of its workers) and read rows in the epoch's order (``epoch_rows``). The driver reads
    the Parquet file a row group at a time, so its memory stays flat; Ray spills blocks to disk when a
    split outgrows the object store.
    """

    blocks: tuple
    rows: int

    def table(self) -> Any:
        import pyarrow as pa
        import ray

        tables = ray.get(list(self.blocks))
        return pa.concat_tables(tables) if tables else None

    def reader(self) -> "SplitReader":
        return TableReader(self.table())

    def describe(self) -> str:
        return "object store"


class SplitReader(Protocol):
    """What a worker reads a training split through: every row's length, rows by index, and the row groups
    the epoch's order shuffles within (None: the whole split is one window)."""

    lengths: Any
    group_rows: Sequence[int] | None

    def take(self, indices: Sequence[int]) -> Any: ...


@dataclass
class TableReader:
    """A split held whole in the worker's memory (from the object store)."""

    table: Any
    group_rows: Sequence[int] | None = None
    lengths: Any = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = row_lengths(self.table)

    def take(self, indices: Sequence[int]) -> Any:
        return self.table.take(indices)


def put_split(files: list[Location]) -> SplitBlocks:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    blocks, rows = [], 0
    for file in files:
        with file.open_input_file() as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BLOCK_ROWS):
                blocks.append(ray.put(pa.Table.from_batches([batch])))
                rows += batch.num_rows
    return SplitBlocks(tuple(blocks), rows)


def epoch_rows(rows: int, seed: int, epoch: int, rank: int, world_size: int,
               group_rows: Sequence[int] | None = None, window: int = 0) -> Any:
    """This worker's rows for one epoch, in training order: a seeded permutation of the whole split, dealt
    round-robin to the workers, as torch's ``DistributedSampler`` does with ``set_epoch``.

    A split read from storage as it goes (``group_rows``: the rows of each of its row groups, more groups
    than ``window``) cannot be permuted whole without reading every row group for every micro-batch: its
    row groups are permuted, and the rows within each ``window`` of them, so a worker holds one window at a
    time. With one window it is the whole-split permutation, row for row.

    Every epoch has its own order, the same on every run and every restart (a resumed run recomputes it
    and starts at its data position), and every worker gets ``rows // world_size`` rows, so all run the
    same number of steps, which the collectives of DDP and ZeRO-3 need.
    """
    import numpy as np

    if not group_rows or window >= len(group_rows):
        order = np.random.default_rng([seed, epoch]).permutation(rows)
    else:
        starts = np.concatenate([[0], np.cumsum(group_rows)])
        groups = np.random.default_rng([seed, epoch]).permutation(len(group_rows))
        order = np.concatenate([
            np.random.default_rng([seed, epoch, number]).permutation(
                np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups[first:first + window]]))
            for number, first in enumerate(range(0, len(groups), window))])
    return order[rank::world_size][:rows // world_size]


def eval_rows(rows: int, rank: int, world_size: int) -> Any:
    """This worker's share of the eval split, in file order: ``rows // world_size`` rows each (at most
    ``world_size - 1`` rows left out). Equal shares mean equal eval forwards on every rank, which ZeRO-3's
    parameter gathers need: a rank with one more micro-batch would wait for the others forever."""
    import numpy as np

    return np.arange(rows)[rank::world_size][:rows // world_size]


LENGTH_GROUP_MICRO_BATCHES = 16


def length_grouped(lengths: Any, micro_batch_size: int, rng: Any) -> list[Any]:
    """Split a window of rows into micro-batches of similar length, in random order.

    ``lengths`` maps each row index of the window to its length. Sorting the window by length before
    cutting it into micro-batches cuts the padding (the builtin data wastes about 15% of each padded batch
    without it, about 5% with a window of 16 micro-batches), and shuffling the micro-batches keeps long
    and short ones mixed across steps. Like transformers' ``group_by_length``, which sorts "megabatches"
    the same way.
    """
    ordered = sorted(lengths, key=lambda index: (lengths[index], index))
    chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    rng.shuffle(chunks)
    return chunks


def micro_batch_rows(order: Any, lengths: Any, micro_batch_size: int, *, drop_last: bool, group_by_length: bool,
                     seed: int = 0, epoch: int = 0) -> list[Any]:
    """The row indices of each micro-batch, in order: fixed by the arguments alone, so a resumed run
    starts at its data position by index, without reading what came before.

    With ``group_by_length`` each window of ``LENGTH_GROUP_MICRO_BATCHES`` micro-batches is grouped by
    length (``length_grouped``). ``drop_last`` drops a short last micro-batch: at most one per epoch, and
    only the epoch's last window can be short.
    """
    import random

    order = [int(index) for index in order]
    if group_by_length:
        window = LENGTH_GROUP_MICRO_BATCHES * micro_batch_size
        chunks = []
        for number, start in enumerate(range(0, len(order), window)):
            rng = random.Random(f"{seed}:{epoch}:{number}")
            part = order[start:start + window]
            chunks += length_grouped({index: lengths[index] for index in part}, micro_batch_size, rng)
    else:
        chunks = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return [chunk for chunk in chunks if not drop_last or len(chunk) == micro_batch_size]


def row_lengths(table: Any) -> Any:
    import pyarrow.compute as pc

    return pc.list_value_length(table.column("input_ids")).to_numpy()


def micro_batches(table: Any, rows: list[Any], pad_token_id: int, *, pin_memory: bool = False) -> Iterator[dict]:
    """Collated micro-batches for lists of row indices, built as they are needed, from an Arrow table or a
    ``SplitReader``. ``pin_memory`` (for a GPU) pins them, so that the strategies' copy to the GPU does not
    block."""
    for indices in rows:
        batch = collate_arrow(table.take(indices), pad_token_id)
        yield {key: value.pin_memory() for key, value in batch.items()} if pin_memory else batch
