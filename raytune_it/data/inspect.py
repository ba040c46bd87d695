"""``raytune-it data inspect``: statistics and the first example, as the model sees it."""

from __future__ import annotations

import json
from itertools import islice

from raytune_it.config.schema import JobConfig
from raytune_it.data.pipeline import dataset_stats, iter_split_records
from raytune_it.data.prompt_format import PromptFormat
from raytune_it.data.records import ReadReport
from raytune_it.data.tokenize import IGNORE_INDEX, tokenize_records


def inspect_dataset(config: JobConfig, as_json: bool = False) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from rich.text import Text

    from raytune_it.models.loading import load_tokenizer

    out, err = Console(), Console(stderr=True)
    tokenizer = load_tokenizer(config.model.name_or_path, revision=config.model.revision,
                               trust_remote_code=config.model.trust_remote_code)
    max_len = config.train.max_seq_len
    with Progress(TextColumn("reading records"), BarColumn(), TextColumn("{task.completed:,}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task("read", total=None)
        stats = dataset_stats(config.data, tokenizer, max_len, config.train.seed,
                              progress=lambda: progress.advance(task))
    if as_json:
        print(json.dumps(stats.to_dict(), indent=2))
        return

    table = Table(title=f"Dataset: {stats.path}", show_header=False)
    rows = [
        ("records", f"{stats.records:,}"),
        ("train / eval records", f"{stats.train_records:,} / {stats.eval_records:,}"),
        ("bad records skipped", f"{stats.bad_records_skipped:,}"),
        ("tokens (all examples)", f"{stats.tokens:,}"),
        ("trained tokens (response + EOS)", f"{stats.trained_tokens:,}"),
        ("mean / max length", f"{stats.mean_length:.1f} / {stats.max_length} tokens"),
        (f"truncated at max_seq_len={max_len}", f"{stats.truncated:,}"),
        ("dropped (no response left after truncation)", f"{stats.dropped_no_response:,}"),
        ("sequences" + (" (packed)" if config.data.packing else ""), f"{stats.sequences:,}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    for reason in stats.bad_record_reasons[:5]:
        out.print(f"  skipped: {reason}", markup=False, highlight=False)

    first = next(iter(islice(iter_split_records(config.data, "train", config.train.seed, ReadReport()), 1)), None)
    if first is None:
        out.print("no training example to show")
        return
    example = tokenize_records([first], tokenizer, max_len,
                               chat_template=PromptFormat.for_run(tokenizer, config.data).chat_template)
    if not example:
        out.print("the first record has no response left after truncation")
        return
    ids, labels = example[0]["input_ids"], example[0]["labels"]
    trained = sum(1 for label in labels if label != IGNORE_INDEX)
    out.rule(f"first training example: {len(ids)} tokens, {trained} trained")
    for is_trained, start, end in spans(labels):
        words = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        if is_trained:
            out.print(f"[bold green]── trained: {end - start} tokens ──[/bold green]")
            out.print(Text(words, style="bold green"))
        else:
            out.print(f"[dim]── masked from the loss (labels = {IGNORE_INDEX}): {end - start} tokens ──[/dim]")
            out.print(Text(words, style="dim"))


def spans(labels: list[int]) -> list[tuple[bool, int, int]]:
    """(trained?, start, end) of each run of trained or masked tokens, in order."""
    out: list[tuple[bool, int, int]] = []
    for index, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1] = (trained, out[-1][1], index + 1)
        else:
            out.append((trained, index, index + 1))
    return out
