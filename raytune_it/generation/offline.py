"""``raytune-it generate``: offline batch inference of one or more models over a dataset, on Ray Data.

The driver reads ``data.path`` (any format the project reads, plain prompts too; a bad record is named by
file and line before anything runs) and cuts it into blocks of ``generate.block_rows`` rows. Each
(block, model) pair is one row of a Ray Dataset, mapped by an actor pool of ``generate.num_actors``
engine replicas (``map_batches`` over a callable class, each actor with its CPU or GPU share, spread over
the cluster by Ray). An actor answers its block through the serving engines in batches (``Answerer``)
and writes the block's file itself, atomically, to
``run.storage/run.name/generations/<model>/block-<n>.<jsonl|parquet>``: one row per input with ``id``,
``model``, ``prompt``, ``completion``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason`` and
``error``. A re-run lists the files already there and skips their blocks, so an interrupted job loses at
most the blocks in flight; a re-run of a changed job is refused (``generation.resume``).

Why not ``ray.data.llm``'s vLLM processor: it needs vLLM in the driver's environment (the CPU build pins
``transformers<5.20``, so it lives in ``.venv-vllm`` only), it has no transformers engine for machines
without vLLM, it renders prompts with its own chat-template stage rather than the run's prompt format,
and its output is written by ``write_*`` with no per-block resume. The engines here are the ones Serve
runs, so generation, eval and serving answer alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Iterator

from raytune_it.config.schema import JobConfig
from raytune_it.storage import Location

SUFFIX = {"jsonl": "jsonl", "parquet": "parquet"}
COLUMNS = ("id", "model", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "error")


def generation_models(config: JobConfig) -> dict[str, str]:
    return dict(config.generate.models) or {"base": config.model.name_or_path}


def block_file(folder: Location, model: str, block: int, output_format: str) -> Location:
    """The one home of the output layout: generations/<model>/block-<n>.<suffix>."""
    return folder / model / f"block-{block:05d}.{SUFFIX[output_format]}"


def written_blocks(folder: Location, model: str, output_format: str) -> set[int]:
    suffix = "." + SUFFIX[output_format]
    return {int(name[len("block-"):-len(suffix)]) for name in (folder / model).listdir()
            if name.startswith("block-") and name.endswith(suffix) and name[len("block-"):-len(suffix)].isdigit()}


def input_blocks(config: JobConfig) -> Iterator[tuple[int, list[dict]]]:
    """(block number, records with their ``id``) in file order (a folder's shards one after another); a
    record's own ``id`` field is kept, else its position in the data."""
    from raytune_it.data.pipeline import resolve_data_paths
    from raytune_it.data.records import iter_records

    records = iter_records(resolve_data_paths(config.data), config.data.file_type,
                           skip_bad_records=config.data.skip_bad_records, limit=config.data.max_records,
                           record_format=config.data.format, answers_required=False)
    position = 0
    for block in range(10**9):
        chunk = list(islice(records, config.generate.block_rows))
        if not chunk:
            return
        for record in chunk:
            own = record.get("id")
            record["id"] = own if isinstance(own, (str, int)) and not isinstance(own, bool) else position
            position += 1
        yield block, chunk


@dataclass
class GenerateSummary:
    output: str
    models: list[str]
    input_rows: int
    blocks: int
    blocks_skipped: int
    rows_written: int
    completion_tokens: int
    errors: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


class GenerateActor:
    """One engine replica of the actor pool: answers (block, model) rows and writes each block's file."""

    def __init__(self, config: dict, output: str) -> None:
        from raytune_it.generation.answers import Answerer, Sampling, resolve_models
        from raytune_it.storage import as_location

        self.config = job = JobConfig.model_validate(config)
        serve = job.serve.model_copy(update={"use_gpu": job.generate.use_gpu})
        entries = resolve_models(job.model.name_or_path, generation_models(job), "generate.models")
        self.answerer = Answerer(serve, job.data, job.generate.batch_size, entries)
        self.entries = {e.name: e for e in entries}
        self.sampling = Sampling(job.generate.max_new_tokens, job.generate.temperature, job.generate.top_p,
                                 job.generate.seed)
        self.output = as_location(output)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"block": [], "model": [], "rows": [], "completion_tokens": [], "errors": []}
        for block, model, payload in zip(batch["block"], batch["model"], batch["records"]):
            records = json.loads(payload)
            entry = self.entries[str(model)]
            rows = []
            answers = [a for part in self.answerer.answers(entry, records, self.sampling) for a in part]
            for record, answer in zip(records, answers):
                rows.append({"id": record["id"], "model": entry.name, **asdict(answer)})
            write_block(block_file(self.output, entry.name, int(block), self.config.generate.output_format), rows)
            out["block"].append(int(block))
            out["model"].append(entry.name)
            out["rows"].append(len(rows))
            out["completion_tokens"].append(sum(row["completion_tokens"] for row in rows))
            out["errors"].append(sum(1 for row in rows if row["error"]))
        return out

    def __del__(self) -> None:
        answerer = self.__dict__.get("answerer")
        if answerer is not None:
            answerer.close()


def write_block(target: Location, rows: list[dict]) -> None:
    """The block's rows, whole or not at all (``write_bytes``): a file that exists is a finished block."""
    if target.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{k: (str(v) if k == "id" else v) for k, v in row.items()}
                                             for row in rows]), buffer)
        target.write_bytes(buffer.getvalue())
    else:
        target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def generate(config: JobConfig, console: Any = None) -> GenerateSummary:
    """Run every model of ``generate.models`` over ``data.path``; see the module docstring."""
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from raytune_it.cluster import ray_session
    from raytune_it.generation.resume import check_same_job, job_inputs
    from raytune_it.storage import check_writable
    from raytune_it.train.driver import run_dir_of

    console = console or Console()
    models = generation_models(config)
    output = run_dir_of(config) / "generations"
    check_writable(output)  # now, not as every actor's first block fails
    section = config.generate
    done = {name: written_blocks(output, name, section.output_format) for name in models}
    work: list[dict[str, Any]] = []
    input_rows, blocks = 0, 0
    digest = hashlib.blake2b(digest_size=16)
    for block, records in input_blocks(config):  # read and checked before Ray starts
        blocks += 1
        input_rows += len(records)
        texts = [json.dumps(record, ensure_ascii=False) for record in records]
        payload = "[" + ", ".join(texts) + "]"  # json.dumps(records), each record encoded once
        for text in texts:  # record by record: the same data cut into other blocks has the same digest
            digest.update(text.encode() + b"\0")
        work += [{"block": block, "model": name, "records": payload, "rows": len(records)}
                 for name in models if block not in done[name]]
    for name, inputs in job_inputs(config, models, digest.hexdigest()).items():  # another job's blocks: refused
        check_same_job(output / name, inputs, len(done[name]))
    skipped = blocks * len(models) - len(work)
    if skipped:
        console.print(f"generate: {skipped} of {blocks * len(models)} blocks already written in {output.uri}; "
                      "skipping them", markup=False, highlight=False)
    started = time.perf_counter()
    written = tokens = errors = 0
    if work:
        with ray_session(min_cpus=section.num_actors * section.cpus_per_actor):
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the bar below counts rows, not Ray Data's operators
            context.print_on_execution_start = False
            items = ray.data.from_items([{k: v for k, v in item.items() if k != "rows"} for item in work])
            dataset = items.repartition(len(work)).map_batches(
                GenerateActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=section.num_actors),
                num_cpus=section.cpus_per_actor,
                num_gpus=1 if section.use_gpu else 0,
                fn_constructor_kwargs={"config": config.to_dict(include_secrets=False), "output": output.uri})
            columns = [TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                       TimeRemainingColumn()]
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("generate", total=sum(item["rows"] for item in work))
                for row in dataset.iter_rows():
                    written += row["rows"]
                    tokens += row["completion_tokens"]
                    errors += row["errors"]
                    progress.advance(task, row["rows"])
    summary = GenerateSummary(output.uri, list(models), input_rows, blocks, skipped, written, tokens, errors,
                              round(time.perf_counter() - started, 2))
    print_summary(summary, section.num_actors, console)
    return summary


def print_summary(summary: GenerateSummary, actors: int, console: Any) -> None:
    from rich.table import Table

    table = Table(title="raytune-it generate")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in (("models", ", ".join(summary.models)), ("input rows", f"{summary.input_rows:,}"),
                       ("blocks (per model)", f"{summary.blocks:,}"),
                       ("blocks skipped (already written)", f"{summary.blocks_skipped:,}"),
                       ("rows written", f"{summary.rows_written:,}"),
                       ("rows with an error", f"{summary.errors:,}"),
                       ("completion tokens", f"{summary.completion_tokens:,}"),
                       (f"time ({actors} actor{'s' if actors > 1 else ''})", f"{summary.seconds:.1f} s"),
                       ("rows/s", f"{summary.rows_per_second:.2f}")):
        table.add_row(key, value)
    console.print(table)
    console.print(f"generations: {summary.output}", markup=False, highlight=False)
