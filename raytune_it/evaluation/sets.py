"""Held-out evaluation sets from the generated task families.

Examples come from a seed the training data never uses, and any example whose
instruction and input also occur in the training file is dropped, so a tuned
model cannot score by recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from raytune_it.data.synthetic import FAMILIES, generate

EVAL_SEED = 1_000_003


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input", "")


def training_keys(path: Path | None) -> set[tuple[str, str]]:
    if path is None or not Path(path).is_file():
        return set()
    import json

    with open(path, encoding="utf-8") as handle:
        return {_key(json.loads(line)) for line in handle if line.strip()}


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
