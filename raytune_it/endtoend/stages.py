"""``raytune-it run``: the whole service, stage by stage, into one run folder.

stats + plan -> LoRA sweep (Ray Tune) -> full tuning (ZeRO-3) -> serve base, best
adapter and full model (Ray Serve) and time them at batch 1 -> eval (the three
effects) -> report. Each stage writes its own files in ``run.storage/run.name``;
the report is rendered from those files alone, so ``raytune-it report`` can
rebuild it without running anything.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Iterator

from raytune_it.config.loading import save_config, with_overrides
from raytune_it.config.schema import JobConfig
from raytune_it.storage import Location


def derive(config: JobConfig, overrides: list[str]) -> JobConfig:
    return with_overrides(config, overrides, "a stage of raytune-it run")


def stage_configs(config: JobConfig, run_dir: Location) -> dict[str, JobConfig]:
    """Every stage's job: all inside the run folder, all trained on the families eval does not hold out."""
    from raytune_it.evaluation.driver import seen_families

    families = json.dumps(seen_families(config))
    storage = f"run.storage={json.dumps(run_dir.uri)}"
    common = [storage, f"data.builtin_families={families}"]
    return {
        "sweep": derive(config, [*common, "run.name=sweep"]),
        "full": derive(config, [*common, "run.name=full", *config.e2e.full_overrides]),
        "eval": derive(config, [storage, "run.name=eval"]),
    }


def _write(path: Location, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def stats_and_plan(config: JobConfig, run_dir: Location, console: Any) -> None:
    from raytune_it.data.pipeline import dataset_stats
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.plan.planner import plan, workload_from_config
    from raytune_it.plan.render import print_plan, survey_table

    tokenizer = load_tokenizer(config.model.name_or_path)
    stats = dataset_stats(config.data, tokenizer, config.train.max_seq_len, config.train.seed)
    _write(run_dir / "stats.json", stats.to_dict())
    console.print(f"data: {stats.records:,} records ({stats.train_records:,} train / {stats.eval_records:,} eval), "
                  f"mean {stats.mean_length:.0f} / max {stats.max_length} tokens, {stats.truncated:,} truncated",
                  markup=False, highlight=False)
    this_run = plan(workload_from_config(config, records=stats.train_records, mean_tokens=stats.mean_length))
    print_plan(this_run, console)
    _write(run_dir / "plan.json", {"this_run": this_run.to_dict(),
                                   "survey_table": [p.to_dict() for p in survey_table()]})


def serve_and_time(config: JobConfig, deployments: list[tuple[str, str, dict[str, str]]],
                   console: Any) -> dict[str, Any]:
    """Serve each (base model, its served name, {adapter name: adapter dir}) in turn; time every model it
    serves through POST /v1/latency."""
    import httpx
    from ray import serve

    from raytune_it.serving.run import start

    results: dict[str, Any] = {}
    # The deployment requires the key the user set (the config's, or RAYTUNE_IT_API_KEY): send it.
    key = config.serve.resolved_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        for base, base_name, adapters in deployments:
            serve_config = derive(config, [f"serve.base_model={json.dumps(base)}", f"serve.model_name={base_name}",
                                           f"serve.adapters={json.dumps(adapters)}", "serve.num_replicas=1"])
            with console.status(f"serve: deploying {', '.join([base_name, *adapters])}"):
                url = start(serve_config)  # replaces the previous deployment of the same application
            for name in [base_name, *adapters]:
                response = httpx.post(f"{url}/v1/latency", timeout=600, headers=headers, json={
                    "model": name, "prompt_tokens": 32, "max_tokens": config.e2e.latency_max_tokens,
                    "repeats": config.e2e.latency_repeats, "ignore_eos": True})
                response.raise_for_status()
                body = response.json()
                results[name] = {"base": base, "adapter": adapters.get(name), **body["median"],
                                 "device": body.get("device"), "engine": body.get("engine")}
                console.print(f"serve: {name}: {body['median']['tokens_per_second']:.0f} tokens/s at batch 1 "
                              f"(median of {config.e2e.latency_repeats}, {config.e2e.latency_max_tokens} tokens)",
                              markup=False, highlight=False)
    finally:
        serve.shutdown()
    return results


@contextmanager
def _timed(name: str, times: dict[str, float], console: Any) -> Iterator[None]:
    console.rule(f"[bold]{name}")
    started = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - started, 1)


def run_all(config: JobConfig, console: Any = None) -> Location:
    from rich.console import Console

    from raytune_it.cluster import ray_session
    from raytune_it.endtoend.report import write_report
    from raytune_it.evaluation.driver import evaluate
    from raytune_it.storage import check_writable
    from raytune_it.train.driver import check_resume_compatible, run_dir_of, train
    from raytune_it.train.preflight import preflight
    from raytune_it.tune.sweep import sweep

    console = console or Console()
    run_dir = run_dir_of(config)
    check_writable(run_dir.parent)
    configs = stage_configs(config, run_dir)
    for job in configs.values():  # every stage's config is checked before anything starts
        preflight(job)
    # and a re-run resumes each stage: one whose config changed is refused now, not after the stages before it
    check_resume_compatible(configs["sweep"], run_dir_of(configs["sweep"]), sweep=True)
    check_resume_compatible(configs["full"], run_dir_of(configs["full"]))
    save_config(config, run_dir)
    times: dict[str, float] = {}
    started = time.perf_counter()
    with ray_session(min_cpus=2 * max(job.scaling.num_workers for job in configs.values())):
        with _timed("stats and plan", times, console):
            stats_and_plan(configs["sweep"], run_dir, console)
        with _timed("sweep", times, console):
            outcome = sweep(configs["sweep"], console=console)
        if outcome.best is None:
            raise RuntimeError("the sweep finished no trial; see its table above")
        best = (outcome.folder / "best").uri
        with _timed("full tuning", times, console):
            full = train(configs["full"], console=console)
        full_model = (run_dir / "full" / "export").uri
        with _timed("serve", times, console):
            served = serve_and_time(config, [(config.model.name_or_path, "base", {"lora-best": best}),
                                             (full_model, "full", {})], console)
            _write(run_dir / "serve.json", served)
        with _timed("eval", times, console):
            evaluate(configs["eval"], console=console, models={"general": best, "full": full_model},
                     folder=run_dir / "eval")
        # Written before the report, which reads it: a regenerated report is identical.
        _write(run_dir / "stages.json", {"seconds": times, "total_seconds": round(time.perf_counter() - started, 1)})
        console.rule("[bold]report")
        paths = write_report(run_dir)
    console.print(f"full tuning: {full.tokens_per_second:,.0f} tokens/s; report: {paths[0].uri} and {paths[1].uri} "
                  f"({time.perf_counter() - started:.0f} s in all)", markup=False, highlight=False)
    return run_dir
