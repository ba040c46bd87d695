"""The data pipeline as a job sees it: resolve the source, split, tokenize, pack.

Everything here streams: records are read, split and tokenized in batches, so
memory stays flat however large the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from raytune_it.config.schema import DataSection
from raytune_it.data.records import ReadReport, files_name, iter_records
from raytune_it.data.synthetic import generate, write_jsonl
from raytune_it.data.tokenize import TokenizeStats, pack_examples, tokenize_records
from raytune_it.errors import DataError
from raytune_it.storage import fetch_file, is_uri, open_location

Split = Literal["train", "eval"]
BUILTIN_VERSION = 1
BATCH = 512


def resolve_data_paths(data: DataSection, path: str | None = None) -> list[Path]:
    """Local files for the configured data (or for ``path``, its eval file): the file, or a folder's shards
    (``config.paths.data_files``); a storage file is copied into this node's cache, and built-in sets are
    generated into the cache once."""
    from raytune_it.config.paths import data_files

    key = "data.eval_path" if path is not None and path != data.path else "data.path"
    source = data.path if path is None else path
    if source == "builtin:tasks":
        return [_builtin_file(data)]
    return [fetch_file(open_location(file, key), key) if is_uri(file) else Path(file).expanduser()
            for file in data_files(source, key)]


def data_name(data: DataSection, path: str | None = None) -> str:
    """How messages name the data: the file, or the folder and its shards."""
    return files_name(resolve_data_paths(data, path))


def _builtin_file(data: DataSection) -> Path:
    from filelock import FileLock

    from raytune_it.cache import cache_dir

    families = data.builtin_families
    tag = "" if families is None else "-" + hashlib.blake2b(",".join(sorted(families)).encode(),
                                                              digest_size=6).hexdigest()
    target = cache_dir() / "data" / f"tasks-v{BUILTIN_VERSION}-n{data.builtin_records}-seed0{tag}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            write_jsonl(generate(data.builtin_records, seed=0, families=families), target,
                        key="the data cache (RAYTUNE_IT_CACHE)")
    return target


def split_of(record: dict[str, Any], eval_fraction: float, seed: int) -> Split:
    """Assign a record to train or eval by a hash of its content.

    Content, not position, decides: a reordered or appended file keeps every
    record in its split, and exact duplicates never straddle train and eval.
    """
    if eval_fraction <= 0:
        return "train"
    if "messages" in record:
        import json

        key = f"{seed}\x00" + json.dumps(record["messages"], sort_keys=True, ensure_ascii=False)
    else:
        key = f"{seed}\x00{record['instruction']}\x00{record.get('input', '')}\x00{record['output']}"
    bucket = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def iter_split_records(
    data: DataSection,
    split: Split | None,
    seed: int,
    report: ReadReport,
    on_record: Callable[[dict, Split], None] | None = None,
) -> Iterator[dict]:
    """Validated records of one split (or all with ``split=None``); ``on_record`` sees every record read.
    With ``data.eval_path`` the split is the file a record comes from; otherwise a hash of its content."""
    def read(path: str | None) -> Iterator[dict]:
        return iter_records(resolve_data_paths(data, path), data.file_type, skip_bad_records=data.skip_bad_records,
                            report=report, limit=data.max_records, record_format=data.format)

    if data.eval_path is not None:
        files: list[tuple[str, Split]] = [(data.path, "train"), (data.eval_path, "eval")]
        for path, file_split in files:
            if split is not None and split != file_split:
                continue
            for record in read(path):
                if on_record is not None:
                    on_record(record, file_split)
                yield record
        return
    for record in read(None):
        record_split = split_of(record, data.eval_fraction, seed)
        if on_record is not None:
            on_record(record, record_split)
        if split is None or record_split == split:
            yield record


def iter_examples(
    data: DataSection,
    tokenizer: Any,
    max_seq_len: int,
    split: Split | None,
    seed: int,
    *,
    report: ReadReport | None = None,
    stats: TokenizeStats | None = None,
    on_record: Callable[[dict, Split], None] | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Tokenized (and, with ``data.packing``, packed) examples of one split, streamed."""
    from raytune_it.data.prompt_format import PromptFormat

    report = report if report is not None else ReadReport()
    records = iter_split_records(data, split, seed, report, on_record)
    template = PromptFormat.for_run(tokenizer, data).chat_template

    def tokenized() -> Iterator[dict[str, list[int]]]:
        while batch := list(islice(records, BATCH)):
            try:
                examples = tokenize_records(batch, tokenizer, max_seq_len, stats, chat_template=template)
            except ValueError as exc:  # the run's template cannot render the file's conversations
                raise DataError(f"{data_name(data)}: {exc}") from None
            yield from examples

    yield from pack_examples(tokenized(), max_seq_len) if data.packing else tokenized()


@dataclass
class DatasetStats:
    """What ``raytune-it data inspect`` prints, and what the planner reads."""

    path: str
    records: int
    bad_records_skipped: int
    train_records: int
    eval_records: int
    tokens: int
    trained_tokens: int
    mean_length: float
    max_length: int
    truncated: int
    dropped_no_response: int
    sequences: int
    bad_record_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_stats(
    data: DataSection, tokenizer: Any, max_seq_len: int, seed: int, progress: Callable[[], None] | None = None
) -> DatasetStats:
    """One streaming pass over the whole file: counts, token lengths, truncation, packing."""
    report, stats = ReadReport(), TokenizeStats()
    split_counts = {"train": 0, "eval": 0}

    def count(record: dict, split: Split) -> None:
        split_counts[split] += 1
        if progress is not None:
            progress()

    examples = iter_examples(data, tokenizer, max_seq_len, None, seed, report=report, stats=stats, on_record=count)
    sequences = sum(1 for _ in examples)
    return DatasetStats(
        path=data_name(data), records=report.records, bad_records_skipped=report.bad_records,
        train_records=split_counts["train"], eval_records=split_counts["eval"], tokens=stats.tokens,
        trained_tokens=stats.trained_tokens, mean_length=round(stats.mean_length, 2), max_length=stats.max_length,
        truncated=stats.truncated, dropped_no_response=stats.dropped_no_response, sequences=sequences,
        bad_record_reasons=report.reasons,
    )
