"""``raytune-it eval``: train what the comparison needs, score every model, report the three effects.

The survey claims instruction tuning (1) improves on the base model, (2)
generalizes to tasks not seen in tuning and (3) specializes to a domain. Each
becomes a comparison on held-out examples with a fixed seed:

1. performance: general adapter vs base, on the families seen in tuning;
2. task generalization: general adapter vs base, on ``eval.held_out_families``;
3. domain specialization: the domain adapter vs the general one, on ``eval.domain_families``.

The families are the generated tasks (``builtin:tasks``) or the values of ``eval.family_field`` in the
user's ``eval.data.path``; there, eval's own adapters tune on the file's records that are not eval
examples. Models answer through the serving engines in batches (``serve.engine``, ``eval.batch_size``).
With ``eval.judge`` a judge model also compares each effect's answers pairwise.

The result goes to ``run.storage/run.name/eval/eval.json``, with sample answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raytune_it.config.loading import with_overrides
from raytune_it.config.schema import BUILTIN_DATA, JobConfig
from raytune_it.data.synthetic import FAMILIES
from raytune_it.errors import UserError
from raytune_it.evaluation.harness import Effect, effect, score_models
from raytune_it.evaluation.sets import (
    families_of_domain,
    held_out_examples,
    model_training_keys,
    training_keys,
    user_sets,
)
from raytune_it.storage import Location


@dataclass
class EvalPlan:
    """What eval compares on: the families, the examples per family, and the data each adapter eval trains
    would tune on (as ``data.*`` overrides)."""

    seen: list[str]
    unseen: list[str]
    domain_families: list[str]
    sets: dict[str, list[dict]]
    adapter_data: dict[str, dict[str, Any]]


def seen_families(config: JobConfig) -> list[str]:
    return [f.name for f in FAMILIES if f.name not in config.eval.held_out_families]


def _adapter_config(config: JobConfig, name: str, data: dict[str, Any]) -> JobConfig:
    return with_overrides(config, {
        "method": "lora", **{f"data.{key}": value for key, value in data.items()},
        "train.max_steps": config.eval.train_steps, "train.eval_every_steps": config.eval.train_steps,
        "run.name": f"{config.run.name}-eval-{name}"}, f"eval's {name} adapter")


def builtin_plan(config: JobConfig, exclude: set) -> EvalPlan:
    from raytune_it.data.pipeline import resolve_data_paths

    seen, unseen = seen_families(config), list(config.eval.held_out_families)
    domain = config.eval.domain_families or families_of_domain(config.eval.domain)
    domain_families = [f for f in domain if f in seen]
    adapter_data = {"general": {"path": BUILTIN_DATA, "builtin_families": seen},
                    config.eval.domain: {"path": BUILTIN_DATA, "builtin_families": domain_families}}
    # The general adapter's generated training records hold every seen family's first examples.
    exclude = exclude | training_keys(resolve_data_paths(_adapter_config(config, "general",
                                                                         adapter_data["general"]).data))
    sets = held_out_examples(seen + unseen, config.eval.examples_per_family, exclude)
    return EvalPlan(seen, unseen, domain_families, sets, adapter_data)


def user_plan(config: JobConfig, exclude: set, folder: Location) -> EvalPlan:
    """Eval examples and the adapters' training files from the user's records (written to ``folder``)."""
    from raytune_it.data.pipeline import resolve_data_paths
    from raytune_it.data.records import ReadReport, iter_records

    section = config.eval
    path = resolve_data_paths(section.data)  # type: ignore[arg-type]  # path, file_type: as a DataSection's
    records = iter_records(path, section.data.file_type, skip_bad_records=section.data.skip_bad_records,
                           report=ReadReport(), record_format=section.data.format, required_field=section.family_field,
                           section="eval.data", purpose="evaluate")
    sets, pool = user_sets(records, section.family_field, section.examples_per_family, exclude)
    missing = [f for f in [*section.held_out_families, *(section.domain_families or [])] if f not in sets]
    if missing:
        raise UserError(f"eval: {section.data.path} has no records of the families {', '.join(missing)} in its "
                        f"{section.family_field!r} field; its families: {', '.join(sets)}")
    unseen = list(section.held_out_families)
    seen = [f for f in sets if f not in unseen]
    domain_families = [f for f in section.domain_families or [] if f in seen]
    if not seen or not domain_families:
        raise UserError("eval: every family is held out, or all of eval.domain_families are: nothing is left to "
                        "tune the general or the domain adapter on")
    fmt = "alpaca" if section.data.format == "alpaca" else "messages"
    adapter_data = {}
    for name, families in (("general", seen), (section.domain, domain_families)):
        target = folder / f"train-{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for f in families for r in pool[f])
        # Rewritten only when it changes: the same file (its time kept) is the same prepared dataset, so an eval
        # run again reuses its adapters' tokenized data and their runs, instead of refusing changed data.
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
        adapter_data[name] = {"path": target.uri, "format": fmt, "file_type": "jsonl", "builtin_families": None}
    return EvalPlan(seen, unseen, domain_families, sets, adapter_data)


def train_adapters(config: JobConfig, console: Any, given: dict[str, str], plan: EvalPlan) -> dict[str, str]:
    """The general and the domain adapter, trained with ``raytune-it train`` unless ``given`` names them."""
    from raytune_it.cluster import ray_session
    from raytune_it.train.driver import run_dir_of, train

    models = dict(given)
    wanted = {name: families for name, families in
              {"general": plan.seen, config.eval.domain: plan.domain_families}.items() if name not in models}
    if not wanted:
        return models
    # One local Ray for both: started once, not once an adapter (each start costs seconds and its own banner).
    with ray_session(min_cpus=config.scaling.num_workers * config.scaling.cpus_per_worker):
        for name, families in wanted.items():
            job = _adapter_config(config, name, plan.adapter_data[name])
            console.rule(f"eval: training the {name} adapter on {len(families)} families ({', '.join(families)})")
            train(job, console=console)
            models[name] = (run_dir_of(job) / "export").uri
    return models


def evaluate(config: JobConfig, console: Any = None, models: dict[str, str] | None = None,
             folder: Location | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    from raytune_it.generation.answers import Answerer, resolve_models
    from raytune_it.storage import check_writable
    from raytune_it.train.driver import run_dir_of

    console = console or Console()
    folder = folder or run_dir_of(config) / "eval"
    check_writable(folder)  # unreachable, missing bucket, no permission: now, not after training adapters
    if config.eval.judge is not None:
        from raytune_it.evaluation.judge import check_judge

        check_judge(config.eval.judge)  # its key, its endpoint and its model: now, not after the scores
    given = dict(config.eval.models, **(models or {}))
    # No model is scored on an example it was tuned on: the examples of every evaluated model's training
    # data are left out, so every model is scored on the same unseen examples.
    exclude: set = set()
    for path in given.values():
        exclude |= model_training_keys(path) or set()
    plan = builtin_plan(config, exclude) if config.eval.data.path == BUILTIN_DATA else \
        user_plan(config, exclude, folder)
    models = {"base": config.model.name_or_path, **train_adapters(config, console, given, plan)}
    sets, domain = plan.sets, config.eval.domain
    total = sum(len(v) for v in sets.values()) * len(models)
    entries = resolve_models(config.model.name_or_path, models, "eval.models")
    answerer = Answerer(config.serve, config.data, config.eval.batch_size, entries)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("eval: answering held-out examples", total=total)
            results, answers = score_models(answerer, entries, sets, config.eval.max_new_tokens,
                                            progress=lambda n: progress.advance(task, n))
    finally:
        answerer.close()
    effects: list[Effect] = []
    for tuned in [name for name in ("general", "full") if name in results]:  # every model tuned on the seen families
        effects += [e for e in (
            effect("performance", "tuned beats the base model on held-out examples of the tasks it was tuned on",
                   results, tuned, "base", plan.seen),
            effect("task generalization", "tuned beats the base model on task families held out of tuning",
                   results, tuned, "base", plan.unseen),
        ) if e is not None]
    domain_effect = effect("domain specialization",
                           f"the {domain} adapter beats the general adapter on {domain} tasks",
                           results, domain, "general", plan.domain_families)
    effects += [domain_effect] if domain_effect is not None else []
    outcome = {
        "models": models, "data": config.eval.data.path, "family_field": config.eval.family_field,
        "seen_families": plan.seen, "held_out_families": plan.unseen, "domain": domain,
        "domain_families": plan.domain_families, "examples_per_family": config.eval.examples_per_family,
        "scores": {name: {family: vars(score) for family, score in by_family.items()}
                   for name, by_family in results.items()},
        # The examples every model was scored on: none of them is in any evaluated model's training data.
        "eval_set": sets,
        "effects": [e.to_dict() for e in effects],
    }
    (folder / "eval.json").write_text(json.dumps(outcome, indent=2))  # kept, whatever the judge does next
    if config.eval.judge is not None:
        from raytune_it.evaluation.judge import judge_effects

        outcome["judge"] = judge_effects(config.eval.judge, outcome, answers, console)
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

