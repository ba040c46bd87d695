"""Score models on held-out examples, per task family, and read the three effects off the scores.

A model is a base model directory (or hub id), a fully tuned model directory, or
a peft adapter directory applied to the base. Every model answers every example
with greedy decoding from the same Alpaca prompt the training used, so the
comparison is the same harness on a tiny model and on a 7B checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from raytune_it.data.templates import render_prompt
from raytune_it.evaluation.metrics import METRICS


@dataclass
class FamilyScore:
    family: str
    examples: int
    exact_match: float
    token_f1: float
    rouge_l: float
    samples: list[dict] = field(default_factory=list)


def load_for_eval(path: str, base: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a model directory or a peft adapter directory over ``base``."""
    from raytune_it.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    resolved = resolve_model_path(path)
    if (Path(resolved) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(base), resolved)
        tokenizer = load_tokenizer(resolved if (Path(resolved) / "tokenizer_config.json").is_file() else base)
    else:
        model, tokenizer = load_causal_lm(resolved), load_tokenizer(resolved)
    model.eval()
    return model, tokenizer


def answer(model: Any, tokenizer: Any, record: dict, max_new_tokens: int) -> str:
    import torch

    inputs = tokenizer(render_prompt(record), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def score_model(model: Any, tokenizer: Any, sets: dict[str, list[dict]], max_new_tokens: int,
                progress: Callable[[], None] | None = None, keep_samples: int = 2) -> dict[str, FamilyScore]:
    scores: dict[str, FamilyScore] = {}
    for family, records in sets.items():
        totals = {name: 0.0 for name in METRICS}
        samples = []
        for record in records:
            prediction = answer(model, tokenizer, record, max_new_tokens)
            for name, metric in METRICS.items():
                totals[name] += metric(prediction, record["output"])
            if len(samples) < keep_samples:
                samples.append({"prompt": record["instruction"], "input": record.get("input", ""),
                                "reference": record["output"], "prediction": prediction})
            if progress is not None:
                progress()
        count = max(1, len(records))
        scores[family] = FamilyScore(family, len(records), **{k: v / count for k, v in totals.items()},
                                     samples=samples)
    return scores


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
