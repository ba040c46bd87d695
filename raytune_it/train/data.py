"""The training data as Ray Datasets: tokenized once on the driver, read as shards.

The driver streams the records through the foundation pipeline (template,
masking, truncation, packing, split) and writes the examples to Parquet in the
run folder. Ray Data reads those files and Ray Train splits them equally across
workers (``get_dataset_shard``), so every worker runs the same number of steps,
which the collectives of DDP and ZeRO-3 need. A resumed run finds the files
already there and trains on exactly the same examples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from raytune_it.config.schema import JobConfig
from raytune_it.data.pipeline import iter_examples
from raytune_it.data.records import ReadReport
from raytune_it.data.tokenize import TokenizeStats, collate

ROWS_PER_WRITE = 4096


@dataclass
class PreparedData:
    folder: str
    train_rows: int
    eval_rows: int
    train_tokens: int
    bad_records_skipped: int
    truncated: int

    @classmethod
    def load(cls, folder: Path) -> "PreparedData":
        return cls(**json.loads((folder / "prepared.json").read_text()))


def _write_split(config: JobConfig, tokenizer: Any, split: str, target: Path) -> tuple[int, TokenizeStats, ReadReport]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats, report = TokenizeStats(), ReadReport()
    examples = iter_examples(config.data, tokenizer, config.train.max_seq_len, split, config.train.seed,
                             report=report, stats=stats)
    columns = ["input_ids", "labels"] + (["position_ids"] if config.data.packing else [])
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in columns])
    rows = 0
    with pq.ParquetWriter(target, schema) as writer:
        while chunk := list(islice(examples, ROWS_PER_WRITE)):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            rows += len(chunk)
    return rows, stats, report


def prepare_data(config: JobConfig, tokenizer: Any, run_dir: Path) -> PreparedData:
    """Tokenize both splits into ``run_dir/data`` once; later calls reuse the files."""
    folder = run_dir / "data"
    if (folder / "prepared.json").is_file():
        return PreparedData.load(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_rows, train_stats, report = _write_split(config, tokenizer, "train", folder / "train.parquet")
    eval_rows, eval_stats, _ = _write_split(config, tokenizer, "eval", folder / "eval.parquet")
    prepared = PreparedData(
        folder=str(folder), train_rows=train_rows, eval_rows=eval_rows, train_tokens=train_stats.tokens,
        bad_records_skipped=report.bad_records, truncated=train_stats.truncated + eval_stats.truncated,
    )
    (folder / "prepared.json").write_text(json.dumps(asdict(prepared), indent=2))
    return prepared


def ray_datasets(prepared: PreparedData) -> dict[str, Any]:
    import ray.data

    # Ray Data's per-operator bars would interleave with the training progress line.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    folder = Path(prepared.folder)
    datasets = {"train": ray.data.read_parquet(str(folder / "train.parquet"))}
    if prepared.eval_rows:
        datasets["eval"] = ray.data.read_parquet(str(folder / "eval.parquet"))
    return datasets


def _collate_class():
    from ray.data.collate_fn import ArrowBatchCollateFn

    class PadCollate(ArrowBatchCollateFn):
        """Pads an Arrow batch into tensors; Ray Data runs it in its prefetch threads."""

        def __init__(self, pad_token_id: int) -> None:
            super().__init__()
            self.pad_token_id = pad_token_id

        def __call__(self, batch: Any) -> dict:
            return collate(batch.to_pylist(), self.pad_token_id)

    return PadCollate


def iter_micro_batches(
    shard: Any, micro_batch_size: int, pad_token_id: int, *, seed: int | None = None, drop_last: bool = True
) -> Iterator[dict]:
    """Collated micro-batches (on the worker's device) from its shard, reproducible for a given seed.

    Collation and the host-to-device copy happen in Ray Data's prefetch threads,
    off the training step's critical path.
    """
    return iter(shard.iter_torch_batches(
        batch_size=micro_batch_size,
        collate_fn=_collate_class()(pad_token_id),
        prefetch_batches=2,
        drop_last=drop_last,
        local_shuffle_buffer_size=None if seed is None else 1024,
        local_shuffle_seed=seed,
    ))
