"""Held-out evaluation sets from the generated task families.

On the generated families, examples come from a seed the training data never uses;
on a user's file (``eval.data``), each family's examples are picked by a seeded hash
of their content and the rest of the file is what eval's own adapters tune on. Either
way any example whose question also occurs in the training data of *any* evaluated
model is dropped, so no model is scored on examples it was tuned on, and every model
is scored on the same examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from raytune_it.data.synthetic import FAMILIES, generate

EVAL_SEED = 1_000_003


def record_key(record: dict) -> tuple[str, str]:
    """What makes two examples the same question: an Alpaca record's instruction and input, a
    conversation's turns before its answer."""
    if "messages" in record:
        from raytune_it.data.prompt_format import split_reference

        prompt, _ = split_reference(record)
        return "messages", json.dumps(prompt["messages"], sort_keys=True, ensure_ascii=False)
    return record["instruction"], record.get("input", "")



def training_keys(paths: Sequence[Path], record_format: str = "alpaca") -> set[tuple[str, str]]:
    """The question of every training record of a file or a folder's shards, in any file type and format the
    pipeline reads; the files that are gone are left out."""
    from raytune_it.data.records import iter_records

    present = [path for path in paths if Path(path).is_file()]
    if not present or record_format == "prompt":
        return set()
    return {record_key(record) for record in iter_records(present, skip_bad_records=True,
                                                          record_format=record_format)}


def model_training_keys(model: str) -> set[tuple[str, str]] | None:
    """The training examples behind a model raytune-it tuned: its run's ``config.yaml`` sits in the
    export's folder (a sweep's ``best/``) or the one above it (a run's ``export/``). None for a model
    from elsewhere, such as the base."""
    from raytune_it.config.loading import load_run_config
    from raytune_it.data.pipeline import resolve_data_paths
    from raytune_it.errors import UserError
    from raytune_it.storage import as_location

    try:
        location = as_location(model, "eval.models")
    except UserError:  # not a path or storage URI this machine can read: not a run's export
        return None
    for folder in (location, location.parent):
        if (folder / "config.yaml").is_file():
            data = load_run_config(folder / "config.yaml").data
            try:
                files = resolve_data_paths(data)
            except UserError:  # the run's data is gone (ConfigError and DataError are UserErrors)
                return set()
            return training_keys(files, data.format)
    return None


def held_out_examples(families: Iterable[str], per_family: int, exclude: set[tuple[str, str]],
                      seed: int = EVAL_SEED) -> dict[str, list[dict]]:
    """``per_family`` unseen examples of each family (fewer only if the family has run out of new ones)."""
    out: dict[str, list[dict]] = {}
    for family in families:
        picked: list[dict] = []
        seen = set(exclude)
        for record in generate(per_family * 20, seed=seed, families=[family]):
            if record_key(record) not in seen:
                seen.add(record_key(record))
                picked.append(record)
                if len(picked) == per_family:
                    break
        out[family] = picked
    return out


def families_of_domain(domain: str) -> list[str]:
    return [family.name for family in FAMILIES if family.domain == domain]


def user_sets(records: Iterable[dict], family_field: str, per_family: int, exclude: set[tuple[str, str]],
              seed: int = EVAL_SEED) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(eval examples, training pool) per family of a user's records: ``per_family`` examples each, chosen
    by a seeded hash of the question (stable when the file is reordered or grows), none in ``exclude``;
    every other record whose question is not an eval example's goes to the pool."""
    import hashlib

    by_family: dict[str, list[tuple[int, dict]]] = {}
    for record in records:
        digest = hashlib.blake2b(f"{seed}\x00{record_key(record)}".encode(), digest_size=8).digest()
        by_family.setdefault(record[family_field], []).append((int.from_bytes(digest, "big"), record))
    examples: dict[str, list[dict]] = {}
    pool: dict[str, list[dict]] = {}
    for family in sorted(by_family):
        picked: list[dict] = []
        taken: set = set()
        for _, record in sorted(by_family[family], key=lambda pair: pair[0]):
            key = record_key(record)
            if len(picked) < per_family and key not in exclude and key not in taken:
                picked.append(record)
                taken.add(key)
        examples[family] = picked
        pool[family] = [record for _, record in by_family[family] if record_key(record) not in taken]
    return examples, pool
