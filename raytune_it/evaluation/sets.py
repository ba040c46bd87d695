"""Held-out evaluation sets from the generated task families.

Examples come from a seed the training data never uses, and any example whose
instruction and input also occur in the training data of *any* evaluated model is
dropped, so no model is scored on examples it was tuned on, and every model is
scored on the same examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from raytune_it.data.synthetic import FAMILIES, generate

EVAL_SEED = 1_000_003


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input", "")


def training_keys(path: Path | None, record_format: str = "alpaca") -> set[tuple[str, str]]:
    """Every (instruction, input) of an Alpaca training file, in any file type the pipeline reads. Chat data
    has no instruction field to match the generated examples by: none."""
    from raytune_it.data.records import iter_records

    if path is None or not Path(path).is_file() or record_format != "alpaca":
        return set()
    return {_key(record) for record in iter_records(path, skip_bad_records=True)}


def model_training_keys(model: str) -> set[tuple[str, str]] | None:
    """The training examples behind a model raytune-it tuned: its run's ``config.yaml`` sits in the
    export's folder (a sweep's ``best/``) or the one above it (a run's ``export/``). None for a model
    from elsewhere, such as the base."""
    from raytune_it.config.loading import load_run_config
    from raytune_it.data.pipeline import resolve_data_path
    from raytune_it.storage import as_location

    from raytune_it.errors import UserError

    try:
        location = as_location(model, "eval.models")
    except UserError:  # not a path or storage URI this machine can read: not a run's export
        return None
    for folder in (location, location.parent):
        if (folder / "config.yaml").is_file():
            data = load_run_config(folder / "config.yaml").data
            return training_keys(resolve_data_path(data), data.format)
    return None


def held_out_examples(families: Iterable[str], per_family: int, exclude: set[tuple[str, str]],
                      seed: int = EVAL_SEED) -> dict[str, list[dict]]:
    """``per_family`` unseen examples of each family (fewer only if the family has run out of new ones)."""
    out: dict[str, list[dict]] = {}
    for family in families:
        picked: list[dict] = []
        seen = set(exclude)
        for record in generate(per_family * 20, seed=seed, families=[family]):
            if _key(record) not in seen:
                seen.add(_key(record))
                picked.append(record)
                if len(picked) == per_family:
                    break
        out[family] = picked
    return out


def families_of_domain(domain: str) -> list[str]:
    return [family.name for family in FAMILIES if family.domain == domain]
