"""Score models on held-out examples, per task family, and read the three effects off the scores.

A model is a base model directory (or hub id), a fully tuned model directory, or a peft adapter
directory applied to the base. Every model answers every example with greedy decoding through the
serving engines, in batches (``generation.answers``), each in the prompt format it was tuned with, so the
comparison is the same harness on a tiny model and on a 7B checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from raytune_it.data.prompt_format import split_reference
from raytune_it.evaluation.metrics import METRICS


@dataclass
class FamilyScore:
    family: str
    examples: int
    exact_match: float
    token_f1: float
    rouge_l: float
    samples: list[dict] = field(default_factory=list)


def describe(record: dict) -> dict[str, str]:
    """A record's question as the eval files show it: an Alpaca record's instruction and input, a
    conversation's last user turn and the turns before it."""
    if "messages" not in record:
        return {"prompt": record["instruction"], "input": record.get("input", "")}
    prompt, _ = split_reference(record)
    turns = prompt["messages"]
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=len(turns) - 1)
    return {"prompt": str(turns[last]["content"]) if turns else "",
            "input": "\n".join(f"{t['role']}: {t['content']}" for i, t in enumerate(turns) if i != last)}


def score_models(answerer: Any, entries: Sequence[Any], sets: dict[str, list[dict]], max_new_tokens: int,
                 progress: Callable[[int], None] | None = None,
                 keep_samples: int = 2) -> tuple[dict[str, dict[str, FamilyScore]], dict[str, dict[str, list[str]]]]:
    """Every model's scores per family, and its answers (by family, in the order of ``sets``). Models run
    one after another, each model's examples in batches; an engine is released after its last model."""
    from raytune_it.generation.answers import Sampling

    scores: dict[str, dict[str, FamilyScore]] = {}
    answers: dict[str, dict[str, list[str]]] = {}
    for position, entry in enumerate(entries):
        scores[entry.name], answers[entry.name] = {}, {}
        for family, records in sets.items():
            items, references = zip(*(split_reference(r) for r in records)) if records else ((), ())
            predictions: list[str] = []
            for batch in answerer.answers(entry, list(items), Sampling(max_new_tokens)):
                predictions += [answer.completion for answer in batch]
                if progress is not None:
                    progress(len(batch))
            answers[entry.name][family] = predictions
            scores[entry.name][family] = family_score(family, records, list(references), predictions, keep_samples)
        answerer.release(entry, keep=entries[position + 1:])
    return scores, answers


def family_score(family: str, records: Sequence[dict], references: Sequence[str | None],
                 predictions: Sequence[str], keep_samples: int = 2) -> FamilyScore:
    totals = {name: 0.0 for name in METRICS}
    for prediction, reference in zip(predictions, references):
        for name, metric in METRICS.items():
            totals[name] += metric(prediction, reference or "")
    samples = [dict(describe(record), reference=reference or "", prediction=prediction)
               for record, reference, prediction in list(zip(records, references, predictions))[:keep_samples]]
    count = max(1, len(records))
    return FamilyScore(family, len(records), **{k: v / count for k, v in totals.items()}, samples=samples)


def mean_over(scores: dict[str, FamilyScore], families: list[str], metric: str) -> float | None:
    picked = [scores[f] for f in families if f in scores and scores[f].examples]
    if not picked:
        return None
    return sum(getattr(s, metric) * s.examples for s in picked) / sum(s.examples for s in picked)


@dataclass
class Effect:
    """One of the survey's three claims, as a comparison of two models on one set of families."""

    name: str
    claim: str
    model: str
    baseline: str
    families: list[str]
    scores: dict[str, float | None]
    baseline_scores: dict[str, float | None]

    @property
    def shows(self) -> bool:
        ours, theirs = self.scores.get("token_f1"), self.baseline_scores.get("token_f1")
        return ours is not None and theirs is not None and ours > theirs

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), shows=self.shows)


def effect(name: str, claim: str, results: dict[str, dict[str, FamilyScore]], model: str, baseline: str,
           families: list[str]) -> Effect | None:
    if model not in results or baseline not in results or not families:
        return None
    return Effect(name, claim, model, baseline, families,
                  {m: mean_over(results[model], families, m) for m in METRICS},
                  {m: mean_over(results[baseline], families, m) for m in METRICS})
