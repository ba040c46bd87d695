"""``raytune-it eval``: train what the comparison needs, score every model, report the three effects.

The survey claims instruction tuning (1) improves on the base model, (2)
generalizes to tasks not seen in tuning and (3) specializes to a domain. Each
becomes a comparison on held-out examples with a fixed seed:

1. performance: general adapter vs base, on the families seen in tuning;
2. task generalization: general adapter vs base, on ``eval.held_out_families``;
3. domain specialization: the domain adapter vs the general one, on the domain's families.

The result goes to ``run.storage/run.name/eval/eval.json``, with sample answers.
"""

from __future__ import annotations

import json
from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.data.synthetic import FAMILIES
from raytune_it.evaluation.harness import Effect, effect, load_for_eval, score_model
from raytune_it.evaluation.sets import families_of_domain, held_out_examples, model_training_keys, training_keys
from raytune_it.storage import Location


def seen_families(config: JobConfig) -> list[str]:
    return [f.name for f in FAMILIES if f.name not in config.eval.held_out_families]


def _adapter_config(config: JobConfig, name: str, families: list[str]) -> JobConfig:
    data = config.to_dict()
    data["method"] = "lora"
    data["data"].update(path="builtin:tasks", builtin_families=families)
    data["train"].update(max_steps=config.eval.train_steps, eval_every_steps=config.eval.train_steps)
    data["run"]["name"] = f"{config.run.name}-eval-{name}"
    return JobConfig.model_validate(data)


def train_adapters(config: JobConfig, console: Any, given: dict[str, str]) -> dict[str, str]:
    """The general and the domain adapter, trained with ``raytune-it train`` unless ``given`` names them."""
    from raytune_it.train.driver import run_dir_of, train

    models = dict(given)
    seen = seen_families(config)
    domain = config.eval.domain
    wanted = {"general": seen, domain: [f for f in families_of_domain(domain) if f in seen]}
    for name, families in wanted.items():
        if name in models:
            continue
        job = _adapter_config(config, name, families)
        console.rule(f"eval: training the {name} adapter on {len(families)} families ({', '.join(families)})")
        train(job, console=console)
        models[name] = (run_dir_of(job) / "export").uri
    return models


def evaluate(config: JobConfig, console: Any = None, models: dict[str, str] | None = None,
             folder: Location | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    from raytune_it.data.pipeline import resolve_data_path
    from raytune_it.train.driver import run_dir_of

    console = console or Console()
    given = dict(config.eval.models, **(models or {}))
    models = {"base": config.model.name_or_path, **train_adapters(config, console, given)}
    seen, unseen = seen_families(config), list(config.eval.held_out_families)
    domain = config.eval.domain
    domain_families = [f for f in families_of_domain(domain) if f in seen]
    # No model is scored on an example it was tuned on: the examples of every evaluated model's training data
    # are left out, so every model is scored on the same unseen examples.
    exclude = training_keys(resolve_data_path(_adapter_config(config, "general", seen).data))
    for path in models.values():
        exclude |= model_training_keys(path) or set()
    sets = held_out_examples(seen + unseen, config.eval.examples_per_family, exclude)
    total = sum(len(v) for v in sets.values()) * len(models)
    results = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("eval: answering held-out examples", total=total)
        for name, path in models.items():
            model, tokenizer = load_for_eval(path, config.model.name_or_path)
            results[name] = score_model(model, tokenizer, sets, config.eval.max_new_tokens,
                                        progress=lambda: progress.advance(task))
    effects: list[Effect] = []
    for tuned in [name for name in ("general", "full") if name in results]:  # every model tuned on the seen families
        effects += [e for e in (
            effect("performance", "tuned beats the base model on held-out examples of the tasks it was tuned on",
                   results, tuned, "base", seen),
            effect("task generalization", "tuned beats the base model on task families held out of tuning",
                   results, tuned, "base", unseen),
        ) if e is not None]
    domain_effect = effect("domain specialization",
                           f"the {domain} adapter beats the general adapter on {domain} tasks",
                           results, domain, "general", domain_families)
    effects += [domain_effect] if domain_effect is not None else []
    outcome = {
        "models": models, "seen_families": seen, "held_out_families": unseen, "domain": domain,
        "domain_families": domain_families, "examples_per_family": config.eval.examples_per_family,
        "scores": {name: {family: vars(score) for family, score in by_family.items()}
                   for name, by_family in results.items()},
        # The examples every model was scored on: none of them is in any evaluated model's training data.
        "eval_set": sets,
        "effects": [e.to_dict() for e in effects],
    }
    folder = folder or run_dir_of(config) / "eval"
    (folder / "eval.json").write_text(json.dumps(outcome, indent=2))
    print_eval(outcome, console)
    console.print(f"eval results: {(folder / 'eval.json').uri}", markup=False, highlight=False)
    return outcome


def family_rows(outcome: dict[str, Any], digits: int = 3) -> list[list[str]]:
    """[family, in tuning?, "F1 (EM)" per model] for every family, shared by the printed table and the report."""
    names = list(outcome["scores"])
    rows = []
    for family in outcome["seen_families"] + outcome["held_out_families"]:
        scores = [outcome["scores"][n][family] for n in names]
        if not scores[0]["examples"]:  # every possible example of a small family also occurs in training
            cells = ["no unseen examples"] * len(names)
        else:
            cells = [f"{s['token_f1']:.{digits}f} ({s['exact_match']:.2f})" for s in scores]
        rows.append([family, "no" if family in outcome["held_out_families"] else "yes",
                     str(scores[0]["examples"]), *cells])
    return rows


def print_eval(outcome: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    names = list(outcome["scores"])
    table = Table(title="Held-out token F1 per task family (exact match in brackets)")
    table.add_column("family")
    table.add_column("in tuning")
    table.add_column("examples", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for row in family_rows(outcome, digits=2):
        table.add_row(*row)
    console.print(table)
    effects = Table(title="The three effects of instruction tuning (token F1, mean over the families)")
    for column in ("effect", "comparison", "score", "baseline", "shows?"):
        effects.add_column(column)
    for item in outcome["effects"]:
        effects.add_row(item["name"], f"{item['model']} vs {item['baseline']}",
                        _fmt(item["scores"]["token_f1"]), _fmt(item["baseline_scores"]["token_f1"]),
                        "yes" if item["shows"] else "no")
    console.print(effects)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

