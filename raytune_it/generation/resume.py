"""What decides a model's generated rows, kept beside its blocks, so that a re-run resumes only the same job.

``generate`` skips the blocks already written; that is right after an interruption and wrong after a change.
With other data, another adapter trained in place under the same path, another temperature or block size, the
old blocks would be kept beside new ones and the output would mix two jobs without a word. So the first run
writes ``generations/<model>/job.json`` (a digest of the records read, the models' stamps, the sampling, the
prompt format and the engine), and a re-run that differs is refused, naming what changed, before Ray starts.
"""

from __future__ import annotations

import json
from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.errors import UserError
from raytune_it.storage import Location, redact_uri

JOB_FILE = "job.json"


def job_inputs(config: JobConfig, models: dict[str, str], records_digest: str) -> dict[str, dict[str, Any]]:
    """For each model (name -> path): everything that decides the rows of its blocks, and nothing that does
    not (the output format names the files; actors and batch sizes do not change an answer). The data is the
    digest of the records as read (``records_digest``), so a file copied or touched again is the same data,
    and one with a record changed, added, skipped or cut off by data.max_records is not."""
    from raytune_it.data.stamps import model_stamp

    data, section = config.data, config.generate
    shared: dict[str, Any] = {
        "data.records": records_digest,
        "data.format": data.format, "data.template": data.template,
        "generate.block_rows": section.block_rows, "generate.max_new_tokens": section.max_new_tokens,
        "generate.temperature": section.temperature, "generate.top_p": section.top_p, "generate.seed": section.seed,
        "serve.engine": config.serve.engine, "serve.max_model_len": config.serve.max_model_len,
        # an adapter runs on the base model, and a model's prompt format may come from the run's tokenizer
        "model.name_or_path": model_stamp(config.model.name_or_path, config.model.revision),
    }
    # as read back from job.json: lists, not tuples
    return {name: json.loads(json.dumps({**shared, "model": model_stamp(path, config.model.revision)}))
            for name, path in models.items()}


def check_same_job(folder: Location, inputs: dict[str, Any], blocks_written: int) -> None:
    """Record ``inputs`` for a model's folder, or refuse a re-run whose inputs differ from the recorded ones.

    Blocks without a job.json (written before it existed) are taken as this job's; a job.json without blocks
    (a job stopped before its first) is replaced."""
    record = folder / JOB_FILE
    if not record.exists() or not blocks_written:
        record.write_text(json.dumps(inputs, indent=2, sort_keys=True))
        return
    try:
        recorded = json.loads(record.read_text())
    except ValueError:
        recorded = {}
    changed = sorted(key for key in inputs.keys() | recorded.keys() if inputs.get(key) != recorded.get(key))
    if changed:
        raise UserError(
            f"{redact_uri(folder.uri)} holds {blocks_written} block(s) of another job: {', '.join(changed)} changed "
            f"since they were written (see its {JOB_FILE}). A re-run would mix the two jobs' rows. Give this job a "
            "new run.name, or delete the folder to start it over.")
