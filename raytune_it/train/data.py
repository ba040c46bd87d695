"""The training data as Ray Datasets: tokenized once on the driver, read as shards.

The driver streams the records through the foundation pipeline (template,
masking, truncation, packing, split) and writes the examples to Parquet in the
run folder, on whatever storage holds it. Those files become Ray Datasets (see ``_split_dataset``) and Ray
Train splits them equally across workers (``get_dataset_shard``), so every
worker runs the same number of steps, which the collectives of DDP and ZeRO-3 need. A resumed run finds the files
already there and trains on exactly the same examples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Iterator

from raytune_it.config.schema import JobConfig
from raytune_it.data.pipeline import iter_examples
from raytune_it.data.records import ReadReport
from raytune_it.data.tokenize import TokenizeStats, collate, collate_arrow
from raytune_it.storage import Location

ROWS_PER_WRITE = 4096


@dataclass
class PreparedData:
    train_rows: int
    eval_rows: int
    train_tokens: int
    bad_records_skipped: int
    truncated: int

    @classmethod
    def load(cls, folder: Location) -> "PreparedData":
        data = json.loads((folder / "prepared.json").read_text())
        data.pop("folder", None)  # written by earlier versions
        return cls(**data)


def _write_split(config: JobConfig, tokenizer: Any, split: str,
                 target: Location) -> tuple[int, TokenizeStats, ReadReport]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats, report = TokenizeStats(), ReadReport()
    examples = iter_examples(config.data, tokenizer, config.train.max_seq_len, split, config.train.seed,
                             report=report, stats=stats)
    columns = ["input_ids", "labels"] + (["position_ids"] if config.data.packing else [])
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in columns])
    rows = 0
    # On an object store the file appears only when the writer closes (one multipart upload).
    with target.open_output_stream() as sink, pq.ParquetWriter(sink, schema) as writer:
        while chunk := list(islice(examples, ROWS_PER_WRITE)):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            rows += len(chunk)
    return rows, stats, report


def prepare_data(config: JobConfig, tokenizer: Any, folder: Location) -> PreparedData:
    """Tokenize both splits into ``folder`` (the run's ``data/``) once; later calls reuse the files.

    ``prepared.json`` is written last: a run interrupted while tokenizing tokenizes again.
    """
    if (folder / "prepared.json").is_file():
        return PreparedData.load(folder)
    train_rows, train_stats, report = _write_split(config, tokenizer, "train", folder / "train.parquet")
    eval_rows, eval_stats, _ = _write_split(config, tokenizer, "eval", folder / "eval.parquet")
    prepared = PreparedData(
        train_rows=train_rows, eval_rows=eval_rows, train_tokens=train_stats.tokens,
        bad_records_skipped=report.bad_records, truncated=train_stats.truncated + eval_stats.truncated,
    )
    (folder / "prepared.json").write_text(json.dumps(asdict(prepared), indent=2))
    return prepared


#: Tokenized splits up to this size (uncompressed) go to Ray's object store straight from the driver;
#: larger ones are streamed from their Parquet files by Ray Data read tasks. The driver holds such a split
#: in memory once, which a head node of a few GiB can afford.
IN_MEMORY_MAX_BYTES = 1 << 30
BLOCK_ROWS = 4096


def _split_dataset(split: Location) -> Any:
    """One split as a Ray Dataset.

    A tokenized instruction set is small (Alpaca's 52k rows are about 75 MB), so
    the driver reads it and puts its blocks in the object store itself. That skips
    Ray Data's file-listing and read tasks, whose worker processes take 10-15 s to
    start on a small node before the first batch, and workers on other nodes never
    need to see the run folder. Splits over ``IN_MEMORY_MAX_BYTES`` stream from
    the files instead, through the run's filesystem: read tasks on any node read
    them from remote storage.
    """
    import pyarrow.parquet as pq

    import ray.data

    with split.open_input_file() as handle:
        metadata = pq.ParquetFile(handle).metadata
    size = sum(metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups))
    if size > IN_MEMORY_MAX_BYTES:
        return ray.data.read_parquet(split.path, filesystem=split.filesystem)
    table = pq.read_table(split.path, filesystem=split.filesystem)
    return ray.data.from_arrow([table.slice(start, BLOCK_ROWS) for start in range(0, max(table.num_rows, 1),
                                                                                   BLOCK_ROWS)])


def ray_datasets(prepared: PreparedData, folder: Location) -> dict[str, Any]:
    import ray.data

    # Ray Data's per-operator bars and its per-execution plan lines (each split, at every restart) would
    # interleave with the training progress line.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    datasets = {"train": _split_dataset(folder / "train.parquet")}
    if prepared.eval_rows:
        datasets["eval"] = _split_dataset(folder / "eval.parquet")
    return datasets


LENGTH_GROUP_MICRO_BATCHES = 16


def length_grouped(rows: list[dict], micro_batch_size: int, rng: Any) -> list[list[dict]]:
    """Split a window of rows into micro-batches of similar length, in random order.

    Sorting the window by length before cutting it into micro-batches cuts the
    padding (the builtin data wastes about 15% of each padded batch without it,
    about 5% with a window of 16 micro-batches), and shuffling the micro-batches
    keeps long and short ones mixed across steps. Like transformers'
    ``group_by_length``, which sorts "megabatches" the same way. The last
    micro-batch of a window can be short; only the epoch's last window is
    partial, so ``drop_last`` drops at most one micro-batch per epoch, made of
    that window's longest rows rather than random ones.
    """
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]))
    chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    rng.shuffle(chunks)
    return chunks


def _collate_class():
    from ray.data.collate_fn import ArrowBatchCollateFn

    class PadCollate(ArrowBatchCollateFn):
        """Pads an Arrow batch into tensors; Ray Data runs it in its prefetch threads.

        With ``group`` set, each Arrow batch is a window of ``group`` micro-batches,
        length-grouped into a list of padded micro-batches.
        """

        def __init__(self, pad_token_id: int, micro_batch_size: int, group: int, seed: int | None) -> None:
            super().__init__()
            self.pad_token_id, self.micro_batch_size, self.group = pad_token_id, micro_batch_size, group
            self.seed = seed

        def __call__(self, batch: Any) -> Any:
            if not self.group:
                return collate_arrow(batch, self.pad_token_id)
            import random

            rows = batch.to_pylist()

            # Seeded by the window's content: Ray Data may collate windows concurrently, out of order,
            # and a resumed run must see the same micro-batches in the same order.
            edges = (rows[0]["input_ids"][:32], rows[-1]["input_ids"][:32])
            rng = random.Random(f"{self.seed}:{len(rows)}:{edges}")
            return [collate(chunk, self.pad_token_id)
                    for chunk in length_grouped(rows, self.micro_batch_size, rng)]

    return PadCollate


def iter_micro_batches(
    shard: Any, micro_batch_size: int, pad_token_id: int, *, seed: int | None = None, drop_last: bool = True,
    group_by_length: bool = False, pin_memory: bool = False,
) -> Iterator[dict]:
    """Collated micro-batches from a worker's shard, reproducible for a given seed.

    Collation happens in Ray Data's prefetch threads, off the training step's
    critical path; the strategies move batches to the device. ``group_by_length``
    reads windows of ``LENGTH_GROUP_MICRO_BATCHES`` micro-batches and yields each
    window's micro-batches grouped by length (see ``length_grouped``). Every
    window but the last is whole, so with ``drop_last`` as many full
    micro-batches come out as without grouping. ``pin_memory`` (for a GPU) pins the
    collated micro-batches in those threads too, so that their copy to the GPU, which
    Ray Data also makes there, does not block.
    """
    group = LENGTH_GROUP_MICRO_BATCHES if group_by_length else 0
    batches = shard.iter_torch_batches(
        batch_size=micro_batch_size * (group or 1),
        collate_fn=_collate_class()(pad_token_id, micro_batch_size, group, seed),
        prefetch_batches=2,
        drop_last=drop_last and not group,
        local_shuffle_buffer_size=None if seed is None else max(1024, 2 * micro_batch_size * (group or 1)),
        local_shuffle_seed=seed,
        pin_memory=pin_memory,
    )
    if not group:
        yield from batches
        return
    for window in batches:
        for micro_batch in window:
            if drop_last and len(micro_batch["input_ids"]) < micro_batch_size:
                continue
            yield micro_batch
