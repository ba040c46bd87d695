"""Prepared datasets: tokenized once, kept in storage under a fingerprint of what decides their rows, shared.

A run's tokenized splits depend on the data files, how they are read (format, file type, record limit,
bad-record rule), the prompt format, the tokenizer, ``train.max_seq_len``, packing and the split (an eval
file, or the eval fraction and seed), and on nothing else: not the method, LoRA rank, batch size or learning
rate. Those inputs are hashed into a key, and the splits are written once to ``<root>/<key>/``, the root being
``data.prepared_root`` (default ``run.storage/_prepared``; a run name starts alphanumeric, so it cannot
clash). A sweep's trials, a re-run under a new name, the next job of the fine-tuning API and
``raytune-it data prepare`` ahead of time all find them there and tokenize nothing.

``prepared.json``, beside the shards, holds the statistics and the inputs that made the key. It is written
last, and it names the Parquet files it describes: each writer names its files with a token of its own, so
two runs preparing one key at once both write whole files and never one another's, on a local disk as on
an object store, without a lock. The one that finds ``prepared.json`` already there when it is done drops
its own files and uses the other's, which hold the same rows.

A run records its key in ``dataset.json`` in its folder, so a resume trains on the very data it started on
(and refuses to go on if that data changed), and the report names it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from raytune_it.config.schema import DataSection, JobConfig
from raytune_it.data.pipeline import iter_examples
from raytune_it.data.records import ReadReport
from raytune_it.data.stamps import data_stamp
from raytune_it.data.tokenize import TokenizeStats
from raytune_it.errors import ConfigError
from raytune_it.storage import Location, check_writable, open_location
from raytune_it.train.data import put_split, write_examples

#: Bump when tokenization changes the rows made from the same inputs: earlier preparations are then not reused.
PREPARED_VERSION = 1
PREPARED_DIR = "_prepared"
STATS_FILE = "prepared.json"
RUN_RECORD = "dataset.json"
PROGRESS_EVERY = 1000
Split = Literal["train", "eval"]


@dataclass
class PreparedData:
    """A prepared dataset's statistics (``prepared.json``) and where its shards are."""

    train_rows: int
    eval_rows: int
    train_tokens: int
    bad_records_skipped: int
    truncated: int
    records: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float | None = None
    key: str | None = None
    train_files: list[str] = field(default_factory=lambda: ["train.parquet"])
    eval_files: list[str] = field(default_factory=lambda: ["eval.parquet"])
    inputs: dict[str, Any] = field(default_factory=dict)
    folder: Location | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, folder: Location) -> "PreparedData":
        data = json.loads((folder / STATS_FILE).read_text())
        known = {f.name for f in fields(cls)} - {"folder"}
        return cls(**{k: v for k, v in data.items() if k in known}, folder=folder)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("folder")
        return json.dumps(data, indent=2)

    def files(self, split: Split) -> list[Location]:
        assert self.folder is not None
        return [self.folder / name for name in (self.train_files if split == "train" else self.eval_files)]


def prepared_root(config: JobConfig) -> Location:
    if config.data.prepared_root:
        return open_location(config.data.prepared_root, "data.prepared_root")
    return open_location(config.run.storage) / PREPARED_DIR


def _tokenizer_digest(tokenizer: Any) -> str:
    """Every file the tokenizer saves (vocabulary, merges, special tokens, BOS/EOS rules, chat template)."""
    digest = hashlib.blake2b(type(tokenizer).__name__.encode(), digest_size=16)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def dataset_inputs(config: JobConfig, tokenizer: Any) -> dict[str, Any]:
    """Everything that decides a run's tokenized rows, and nothing that does not."""
    from raytune_it.data.pipeline import BUILTIN_VERSION
    from raytune_it.data.prompt_format import PromptFormat

    data = config.data
    inputs: dict[str, Any] = {
        "version": PREPARED_VERSION, "format": data.format, "file_type": data.file_type,
        "skip_bad_records": data.skip_bad_records, "max_records": data.max_records,
        "train_file": data_stamp(data.path, "data.path"),
        "eval_file": data_stamp(data.eval_path, "data.eval_path") if data.eval_path else None,
        "template": data.template, "chat_template": PromptFormat.for_run(tokenizer, data).chat_template,
        "tokenizer": _tokenizer_digest(tokenizer), "max_seq_len": config.train.max_seq_len,
        "packing": data.packing,
    }
    if data.path == "builtin:tasks":
        inputs["builtin"] = {"version": BUILTIN_VERSION, "records": data.builtin_records,
                             "families": sorted(data.builtin_families) if data.builtin_families else None}
    if data.eval_path is None:
        inputs["eval_fraction"] = data.eval_fraction
        inputs["split_seed"] = config.train.seed if data.eval_fraction > 0 else None
    return inputs


def dataset_key(inputs: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=10).hexdigest()


def streams(data: DataSection, size: int, object_store_bytes: float) -> bool:
    """Whether the workers stream a training split of ``size`` bytes (in memory) from storage."""
    if data.streaming != "auto":
        return data.streaming == "always"
    return size > data.object_store_share * object_store_bytes


def split_sources(prepared: PreparedData, data: DataSection, console: Any = None) -> dict[str, Any]:
    """The prepared splits for the workers (``train/data.py``): in Ray's object store, or the training split
    left in storage for the workers to stream (``train/streaming.py``) when ``data.streaming`` says so. The
    eval split is small, and every worker keeps it collated: it always goes through the object store."""
    import ray

    from raytune_it.train.streaming import split_bytes, streamed_split

    files = prepared.files("train")
    stream = streams(data, 0, 0)
    if data.streaming == "auto":
        size, store = split_bytes(files), ray.cluster_resources().get("object_store_memory", 0)
        stream = streams(data, size, store)
        if stream and console is not None:
            console.print(f"the training split ({size / 2**30:.2f} GiB) is larger than data.object_store_share="
                          f"{data.object_store_share:g} of the object store ({store / 2**30:.2f} GiB): the workers "
                          "stream it from storage", markup=False, highlight=False)
    splits: dict[str, Any] = {"train": streamed_split(files, data.shuffle_window_row_groups) if stream
                              else put_split(files)}
    if prepared.eval_rows:
        splits["eval"] = put_split(prepared.files("eval"))
    return splits


def write_split(config: JobConfig, tokenizer: Any, split: Split, target: Location,
                on_records: Callable[[int], None] | None = None) -> tuple[int, TokenizeStats, ReadReport]:
    """Stream one split's examples into one Parquet file; ``on_records`` sees the count of records read."""
    stats, report = TokenizeStats(), ReadReport()
    read = 0

    def count(record: dict, record_split: str) -> None:
        nonlocal read
        read += 1
        if on_records is not None and read % PROGRESS_EVERY == 0:
            on_records(read)

    examples = iter_examples(config.data, tokenizer, config.train.max_seq_len, split, config.train.seed,
                             report=report, stats=stats, on_record=count)
    rows = write_examples(examples, target, config.data.packing)
    return rows, stats, report


def _write(config: JobConfig, tokenizer: Any, folder: Location, key: str, inputs: dict[str, Any],
           on_records: Callable[[int], None] | None) -> PreparedData:
    from raytune_it.train.prepare_ray import prepare_on_ray_data, use_ray_data

    token = uuid.uuid4().hex[:12]
    stats: dict[str, tuple[int, TokenizeStats, ReadReport]] = {}
    if use_ray_data(config):
        files, stats = prepare_on_ray_data(config, tokenizer, folder, token, on_records)
    else:
        files = {split: [f"{split}-{token}.parquet"] for split in ("train", "eval")}
        for split in ("train", "eval"):
            stats[split] = write_split(config, tokenizer, split, folder / files[split][0], on_records)
    (train_rows, train, train_report), (eval_rows, evaluated, eval_report) = stats["train"], stats["eval"]
    # Without an eval file both passes read the one file; with it, each pass reads its own.
    reports = [train_report, eval_report] if config.data.eval_path else [train_report]
    capacity = train_rows * config.train.max_seq_len
    prepared = PreparedData(
        train_rows=train_rows, eval_rows=eval_rows, train_tokens=train.tokens,
        bad_records_skipped=sum(r.bad_records for r in reports), truncated=train.truncated + evaluated.truncated,
        records=sum(r.records for r in reports), tokens=train.tokens + evaluated.tokens,
        trained_tokens=train.trained_tokens,
        packing_efficiency=round(train.tokens / capacity, 4) if config.data.packing and capacity else None,
        key=key, train_files=files["train"], eval_files=files["eval"], inputs=inputs,
        folder=folder)
    if (folder / STATS_FILE).is_file():  # another run prepared the same key meanwhile: the same rows, kept once
        for location in prepared.files("train") + prepared.files("eval"):
            location.delete()
        return PreparedData.load(folder)
    (folder / STATS_FILE).write_text(prepared.to_json())
    return prepared


def prepare(config: JobConfig, tokenizer: Any, on_records: Callable[[int], None] | None = None
            ) -> tuple[PreparedData, bool]:
    """The run's prepared dataset, and whether it was already there (nothing tokenized)."""
    inputs = dataset_inputs(config, tokenizer)
    key = dataset_key(inputs)
    folder = prepared_root(config) / key
    if (folder / STATS_FILE).is_file():
        return PreparedData.load(folder), True
    check_writable(prepared_root(config), "data.prepared_root" if config.data.prepared_root else "run.storage")
    return _write(config, tokenizer, folder, key, inputs, on_records), False


def prepare_for_run(config: JobConfig, tokenizer: Any, run_dir: Location,
                    on_records: Callable[[int], None] | None = None) -> tuple[PreparedData, bool]:
    """The dataset this run trains on: the one it recorded (a resume), else the shared one for its config."""
    record = run_dir / RUN_RECORD
    if record.is_file():
        recorded = json.loads(record.read_text())["key"]
        folder = prepared_root(config) / recorded
        if (folder / STATS_FILE).is_file():
            return PreparedData.load(folder), True
        inputs = dataset_inputs(config, tokenizer)
        if dataset_key(inputs) != recorded:
            raise ConfigError(
                f"run {config.run.name!r} started on prepared dataset {recorded}, which is gone from "
                f"{prepared_root(config).uri}, and its data or tokenizer changed since (the key is now "
                f"{dataset_key(inputs)}). A resume must train on the same data: restore the data files, or start "
                "a new run.name.")
    elif (run_dir / "data" / STATS_FILE).is_file():  # a run begun before datasets were shared keeps its own
        return PreparedData.load(run_dir / "data"), True
    prepared, reused = prepare(config, tokenizer, on_records)
    record.write_text(json.dumps({"key": prepared.key, "folder": str(prepared.folder)}, indent=2))
    return prepared, reused


def recorded_dataset(config: JobConfig, run_dir: Location) -> PreparedData | None:
    """The prepared dataset a run recorded, if it is still there (without a tokenizer: nothing is prepared)."""
    record = run_dir / RUN_RECORD
    if record.is_file():
        folder = prepared_root(config) / json.loads(record.read_text())["key"]
        return PreparedData.load(folder) if (folder / STATS_FILE).is_file() else None
    legacy = run_dir / "data"
    return PreparedData.load(legacy) if (legacy / STATS_FILE).is_file() else None


def prepare_ahead(config: JobConfig, *, as_json: bool = False, console: Any = None) -> PreparedData:
    """``raytune-it data prepare``: the config's dataset, tokenized now into the shared root, with its key and
    statistics, so that the runs and sweeps that follow start training at once."""
    from rich.console import Console
    from rich.table import Table

    from raytune_it.models.loading import load_tokenizer

    console = console or Console()
    tokenizer = load_tokenizer(config.model.name_or_path, revision=config.model.revision,
                               trust_remote_code=config.model.trust_remote_code)
    with console.status("preparing the dataset") as status:
        prepared, reused = prepare(
            config, tokenizer, lambda read: status.update(f"tokenizing the dataset: {read:,} records read"))
    if as_json:
        print(json.dumps({"key": prepared.key, "folder": str(prepared.folder), "reused": reused,
                          **json.loads(prepared.to_json())}, indent=2))
        return prepared
    table = Table(title=f"dataset {prepared.key} ({'already prepared' if reused else 'tokenized now'})")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [("records read", f"{prepared.records:,}"),
            ("bad records skipped", f"{prepared.bad_records_skipped:,}"),
            ("train / eval sequences", f"{prepared.train_rows:,} / {prepared.eval_rows:,}"),
            ("tokens (train + eval)", f"{prepared.tokens:,}"),
            ("trained tokens (train)", f"{prepared.trained_tokens:,}"),
            ("truncated at train.max_seq_len", f"{prepared.truncated:,}")]
    if prepared.packing_efficiency is not None:
        rows.append(("packing efficiency", f"{prepared.packing_efficiency:.1%}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"folder {prepared.folder}: a run or sweep of this data in run.storage={config.run.storage} "
                  "(or with data.prepared_root set to its parent) trains on it without tokenizing.",
                  markup=False, highlight=False)
    return prepared
