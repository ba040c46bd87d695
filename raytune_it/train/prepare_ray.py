"""Preparing a dataset as a Ray Data pipeline: the files cut into chunks, tokenized by actors across the cluster.

    chunks (driver: cuts only) -> map_batches(ChunkPreparer), one chunk per call, on an actor pool, the
    tokenizer loaded once per actor -> each chunk's Parquet shards in storage, one stats row back each
    -> (packing) the driver packs the shards in order -> prepared.json

Each actor reads its chunk straight from storage (``data/chunks.py``), checks every record by the one rule
(``checked_records``), splits by content hash, tokenizes and writes its shards; only a row of counts comes
back, so the driver's memory does not grow with the data. Every step is the driver path's, record for record,
and the shards are listed in chunk order, so the rows are the driver path's in the same order: the same
examples, the same epoch order, the same losses. Packing fills rows greedily across chunk ends, so it is done
once, on the driver, over the tokenized shards in order (no tokenizer; a streaming pass).

Bad records keep the driver path's rules: the first bad record in file order stops the run, named by file
and line; skipped ones are counted exactly across chunks, and the first reasons kept are the file's first.

Why ``map_batches`` over the project's own chunk reader, not ``ray.data.read_json``: Ray's readers give no
line numbers, and stop at a malformed line with pyarrow's message, so neither rule could hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from raytune_it.config.schema import JobConfig
from raytune_it.data.chunks import CHUNKED, Chunk, chunk_records, plan_chunks
from raytune_it.data.records import (
    FileType,
    ReadReport,
    check_some_read,
    checked_records,
    detect_file_type,
    file_type_by_name,
    validator,
)
from raytune_it.data.tokenize import TokenizeStats, pack_examples, tokenize_records
from raytune_it.errors import ConfigError, DataError
from raytune_it.storage import Location, is_uri, local, open_location
from raytune_it.train.data import BLOCK_ROWS, ExampleWriter, write_examples

#: Below this much data the driver tokenizes faster than actors start.
RAY_DATA_MIN_BYTES = 64 << 20
#: At least this many chunks per actor where the data allows, all of a size and as many as a multiple of the
#: actors, so that the pool ends together: with a chunk or two each, or a short remainder last, one actor's
#: last chunk runs alone while the others idle. No chunk smaller than ``MIN_CHUNK_BYTES``.
CHUNKS_PER_ACTOR = 4
MIN_CHUNK_BYTES = 1 << 20
BATCH = 512
SPLITS = ("train", "eval")


def _source_kind(data: Any, source: str, location: Location) -> FileType:
    if data.file_type != "auto":
        return data.file_type
    if is_uri(source):  # by its name: any other object is parsed whole, as a JSON array
        return file_type_by_name(source.partition("?")[0]) or "json"
    return detect_file_type(Path(location.path))


def sources(config: JobConfig) -> list[tuple[str, str | None]]:
    """Each data file (a folder's shards in order) and the split all its records go to (None: by content
    hash)."""
    from raytune_it.config.paths import data_files

    data = config.data
    if data.eval_path is None:
        return [(file, None) for file in data_files(data.path)]
    return [(file, split) for path, key, split in ((data.path, "data.path", "train"),
                                                   (data.eval_path, "data.eval_path", "eval"))
            for file in data_files(path, key)]


def _open(config: JobConfig, source: str) -> tuple[Location, str]:
    """Where a process reads ``source`` and the name its records are reported under: a URI from storage
    directly, a local file (or the generated built-in set) by the path the driver path names."""
    from raytune_it.data.pipeline import resolve_data_paths

    if is_uri(source):
        return open_location(source, "data.path"), source
    [resolved] = resolve_data_paths(config.data) if source == "builtin:tasks" else [Path(source).expanduser()]
    return local(resolved), str(resolved)


def _size(location: Location) -> int:
    return location.filesystem.get_file_info(location.path).size or 0


def use_ray_data(config: JobConfig) -> bool:
    """Whether this config's data is prepared on Ray Data (``data.preparation``); a choice that cannot hold
    is refused before anything is read, naming the key."""
    data = config.data
    if data.preparation == "driver":
        return False
    kinds, size = [], 0
    for source, _ in sources(config):
        location, _name = _open(config, source)
        kinds.append(_source_kind(data, source, location))
        size += _size(location)
    problem = ("data.max_records is set (the first N records need the whole file in order)" if data.max_records
               else None if all(kind in CHUNKED for kind in kinds) else
               "the data is a JSON array, which is parsed from its start")
    if data.preparation == "ray_data" and problem:
        raise ConfigError(f"data.preparation=ray_data: {problem}. Write the records as JSON Lines or Parquet, or "
                          "set data.preparation=driver (allowed: auto, driver, ray_data).")
    return problem is None and (data.preparation == "ray_data" or size >= RAY_DATA_MIN_BYTES)


def balanced_chunk_bytes(total_bytes: int, actors: int) -> int:
    """JSON Lines chunk bytes for ``actors``: ``CHUNK_BYTES`` at most, cut so that ``total_bytes`` makes a
    multiple of ``actors`` chunks of one size, at least ``CHUNKS_PER_ACTOR`` each (a folder's shards are cut
    each on their own, at this size; Parquet is cut by row groups)."""
    from raytune_it.data.chunks import CHUNK_BYTES

    chunks = actors * max(CHUNKS_PER_ACTOR, -(-total_bytes // (CHUNK_BYTES * actors)))
    return max(MIN_CHUNK_BYTES, -(-total_bytes // chunks))


def plan(config: JobConfig, actors: int | None = None, **sizes: int) -> list[Chunk]:
    """Every chunk of every data file, numbered in file order: cut evenly for ``actors`` where it is given
    and ``sizes`` are not (``balanced_chunk_bytes``), else at ``sizes`` (the defaults: ``data/chunks.py``)."""
    files = [(source, split, _open(config, source)[0]) for source, split in sources(config)]
    if actors is not None and not sizes:
        sizes = {"chunk_bytes": balanced_chunk_bytes(sum(_size(location) for *_, location in files), actors)}
    chunks: list[Chunk] = []
    for source, split, location in files:
        chunks += plan_chunks(source, location, _source_kind(config.data, source, location), len(chunks), split,
                              **sizes)
    return chunks


def shard_name(token: str, split: str, index: int) -> str:
    return f"{split}-{token}-{index:05d}.parquet"


def prepare_chunk(config: JobConfig, tokenizer: Any, template: str | None, chunk: Chunk, folder: Location,
                  token: str) -> dict[str, Any]:
    """One chunk: read, check, split, tokenize, write its shards; a row of what it found (or its error)."""
    from raytune_it.data.pipeline import split_of

    data = config.data
    location, name = _open(config, chunk.source)
    report = ReadReport()
    out: dict[str, Any] = {"index": chunk.index, "source": chunk.source, "error": "", "stats": "{}"}
    records = checked_records(chunk_records(chunk, location, name), validator(data.format),
                              skip_bad_records=data.skip_bad_records, report=report)
    stats = {split: TokenizeStats() for split in SPLITS}
    writers = {split: ExampleWriter(folder / shard_name(token, split, chunk.index), packed=False)
               for split in SPLITS}
    # A batch at a time, as the driver path streams: an actor holds a batch and a row group, not its chunk.
    try:
        while batch := list(islice(records, BATCH)):
            by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
            for record in batch:
                by_split[chunk.split or split_of(record, data.eval_fraction, config.train.seed)].append(record)
            for split, items in by_split.items():
                try:
                    writers[split].write(tokenize_records(items, tokenizer, config.train.max_seq_len, stats[split],
                                                          chat_template=template) if items else [])
                except ValueError as exc:  # the run's template cannot render the file's conversations
                    raise DataError(f"{name}: {exc}") from None
        out["stats"] = json.dumps({split: asdict(value) for split, value in stats.items()})
    except DataError as exc:
        out["error"] = str(exc)  # the driver deletes every shard of a failed preparation, this chunk's too
    finally:
        for writer in writers.values():
            writer.close()
    out.update({f"{split}_rows": writers[split].rows for split in SPLITS})
    out.update(records=report.records, bad_records=report.bad_records, reasons=json.dumps(report.reasons))
    return out


class ChunkPreparer:
    """A Ray Data actor: the tokenizer once, then one chunk per call (``map_batches(batch_size=1)``).

    The driver's tokenizer comes pickled (unpickling it imports a fraction of what loading it does, which
    takes seconds of each actor's start); one from the model's own code (``trust_remote_code``) is loaded
    by each actor, as its class is importable only where transformers has written that code."""

    def __init__(self, config: dict, template: str | None, folder: str, token: str, tokenizer: Any = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor: no Rust threads on top
        self.config = JobConfig.model_validate(config)
        model = self.config.model
        if tokenizer is None:
            from raytune_it.models.loading import load_tokenizer

            tokenizer = load_tokenizer(model.name_or_path, revision=model.revision,
                                       trust_remote_code=model.trust_remote_code)
        self.tokenizer = tokenizer
        self.template, self.folder, self.token = template, open_location(folder, "data.prepared_root"), token

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        results = [prepare_chunk(self.config, self.tokenizer, self.template, Chunk(**json.loads(str(item))),
                                 self.folder, self.token) for item in batch["chunk"]]
        return {key: [result[key] for result in results] for key in results[0]}


def _merge(stats: list[dict]) -> TokenizeStats:
    total = TokenizeStats()
    for item in stats:
        for key, value in item.items():
            setattr(total, key, max(total.max_length, value) if key == "max_length" else getattr(total, key) + value)
    return total


def _pack(shards: list[Location], target: Location, max_seq_len: int) -> int:
    """Pack the split's tokenized shards, in order, into one file, as the driver path packs its stream."""
    import pyarrow.parquet as pq

    def examples() -> Iterator[dict]:
        for shard in shards:
            with shard.open_input_file() as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=BLOCK_ROWS):
                    yield from batch.to_pylist()

    return write_examples(pack_examples(examples(), max_seq_len), target, packed=True)


def prepare_on_ray_data(config: JobConfig, tokenizer: Any, folder: Location, token: str,
                        on_records: Callable[[int], None] | None = None, chunk_sizes: dict[str, int] | None = None
                        ) -> tuple[dict[str, list[str]], dict[str, tuple[int, TokenizeStats, ReadReport]]]:
    """Both splits of the config's data as shards in ``folder``: the file names per split, and per split its
    rows, tokenization counts and read report (the driver path's ``write_split`` triple)."""
    import ray

    from raytune_it.cluster import ray_session
    from raytune_it.config.paths import data_files
    from raytune_it.data.prompt_format import PromptFormat
    from raytune_it.data.records import KEEP_REASONS, files_name

    template = PromptFormat.for_run(tokenizer, config.data).chat_template
    results: list[dict] = []
    with ray_session():
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller shows records read
        context.print_on_execution_start = False
        actors = config.data.preparation_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunks = plan(config, actors, **(chunk_sizes or {}))
        # One block per chunk, made on the driver: a repartition would need task CPUs that the actors hold,
        # and on a 1-CPU cluster it would wait for them forever.
        items = ray.data.from_items([{"chunk": json.dumps(asdict(chunk))} for chunk in chunks],
                                    override_num_blocks=len(chunks))
        dataset = items.map_batches(
            ChunkPreparer, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(chunks))),
            fn_constructor_kwargs={"config": config.to_dict(include_secrets=False), "template": template,
                                   "folder": folder.uri, "token": token,
                                   "tokenizer": None if config.model.trust_remote_code else tokenizer})
        read = 0
        for row in dataset.iter_rows():
            results.append(dict(row))
            read += int(row["records"]) + int(row["bad_records"])
            if on_records is not None:
                on_records(read)
    results.sort(key=lambda row: int(row["index"]))
    failed = next((row for row in results if row["error"]), None)
    if failed is not None:  # nothing of this preparation is kept
        for row in results:
            for split in SPLITS:
                (folder / shard_name(token, split, int(row["index"]))).delete()
        raise DataError(failed["error"])
    reports: dict[str, ReadReport] = {}
    configured = [config.data.path] + ([config.data.eval_path] if config.data.eval_path else [])
    for path in configured:  # one report per configured path: a folder's shards count together
        inputs = set(data_files(path))
        report = reports[path] = ReadReport()
        for row in (r for r in results if r["source"] in inputs):
            report.records += int(row["records"])
            report.bad_records += int(row["bad_records"])
            report.reasons += json.loads(row["reasons"])
        report.reasons = report.reasons[:KEEP_REASONS]
        check_some_read(files_name([Path(_open(config, file)[1]) for file in data_files(path)]), report)
    files, outcome = {}, {}
    for split in SPLITS:
        shards = [shard_name(token, split, int(row["index"])) for row in results if int(row[f"{split}_rows"])]
        rows = sum(int(row[f"{split}_rows"]) for row in results)
        if config.data.packing and shards:
            packed = f"{split}-{token}.parquet"
            rows = _pack([folder / name for name in shards], folder / packed, config.train.max_seq_len)
            for name in shards:
                (folder / name).delete()
            shards = [packed]
        files[split] = shards
        source = config.data.eval_path if split == "eval" and config.data.eval_path else config.data.path
        outcome[split] = (rows, _merge([json.loads(row["stats"]).get(split, {}) for row in results]), reports[source])
    return files, outcome
