"""``raytune-it sweep``: Ray Tune over the Ray Train job, the Ray 2.60 (Train V2) way.

Each Tune trial runs the same driver as ``raytune-it train`` (its own
TorchTrainer) with the trial's overrides; ``TuneReportCallback`` forwards the
Train reports (eval steps) to Tune, where ASHA compares trials on eval loss.
Trials are enumerated and validated up front (``space.py``); those the memory
model says cannot fit are skipped with the reason and never launched.

Layout: ``run.storage/run.name/`` holds ``config.yaml``, ``tune/`` (Tune's
state; a re-run with the same name restores it), ``trials/trial-NNN/`` (each a
normal run folder, so an interrupted trial resumes from its checkpoint),
``results.csv``, ``results.parquet``, the plots and ``best/``, on whatever
storage ``run.storage`` names (Tune keeps its state there through the same
pyarrow filesystem).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from raytune_it.config.loading import save_config, with_overrides
from raytune_it.config.schema import JobConfig
from raytune_it.hardware import SERVER_TYPES
from raytune_it.storage import Location, check_writable
from raytune_it.tracking import tracked_run
from raytune_it.train.step_metrics import step_eval_loss
from raytune_it.tune.layout import trial_dir, trial_name, trials_dir
from raytune_it.tune.space import Trial, expand_trials

GIB = 2**30


def memory_budget_bytes(config: JobConfig) -> float | None:
    if config.tune.memory_budget_gib is not None:
        return config.tune.memory_budget_gib * GIB
    if config.scaling.server_type != "any":
        return SERVER_TYPES[config.scaling.server_type].gpu_memory_gib * GIB
    return None


def mark_infeasible(trials: list[Trial], budget: float | None) -> None:
    """Skip trials the planner says exceed the per-device budget, with its reason."""
    from raytune_it.plan.memory import shape_of_config
    from raytune_it.plan.planner import config_fit_problem, estimate_for_config

    shape = shape_of_config(trials[0].config)
    for trial in trials:
        trial.memory_bytes = estimate_for_config(trial.config, shape).total
        if budget is not None:
            trial.skipped_reason = config_fit_problem(trial.config, shape, budget)


class _SweepReportCallback:
    """Tune's report callback, with the latest eval loss carried on every report for ASHA."""

    def __new__(cls) -> Any:
        from ray.tune.integration.ray_train import TuneReportCallback

        class Carry(TuneReportCallback):
            def __init__(self) -> None:
                super().__init__()
                self.last_eval = math.inf

            def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
                value = step_eval_loss(metrics[0])
                if value is not None:
                    self.last_eval = value
                super().after_report(run_context, [dict(metrics[0], eval_loss=self.last_eval)] + metrics[1:],
                                     checkpoint)

        return Carry()


def run_trial(params: dict, trial_configs: dict, trials_uri: str, tracking_parent: Any = None) -> None:
    """One Tune trial: the ordinary training driver on this trial's config (tracked under the sweep's run)."""
    from io import StringIO

    from rich.console import Console

    from raytune_it.train.driver import train

    index = params["trial"]
    config = JobConfig.model_validate(trial_configs[index])
    config.run.storage = trials_uri
    config.run.name = trial_name(index)
    train(config, console=Console(file=StringIO()), callbacks=[_SweepReportCallback()],
          tracking_parent=tracking_parent)


@dataclass
class SweepOutcome:
    folder: Location
    rows: list[dict]
    best: dict | None


def default_concurrency(config: JobConfig) -> int:
    import ray

    resources = ray.cluster_resources()
    # Each trial's workers, plus one CPU for what runs beside them: the trial's driver, its Train controller
    # and progress queue, each a process of its own.
    per_trial_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker + 1
    limit = max(1, int(resources.get("CPU", 1) // per_trial_cpus))
    if config.scaling.use_gpu:
        limit = min(limit, int(resources.get("GPU", 0) // config.scaling.num_workers) or 1)
    return limit


def sweep(config: JobConfig, *, console: Any = None) -> SweepOutcome:
    from rich.console import Console

    from raytune_it.cluster import ray_session
    from raytune_it.train.driver import check_resume_compatible, run_dir_of
    from raytune_it.train.preflight import preflight
    from raytune_it.tune.results import collect_rows, write_outputs

    console = console or Console()
    folder = run_dir_of(config)
    check_writable(folder.parent)
    check_resume_compatible(config, folder, sweep=True)  # else a re-run would label old trials with new values
    trials = expand_trials(config)
    for trial in trials:  # each trial's own values (a rank, a method), against one meta model
        preflight(trial.config)
    mark_infeasible(trials, memory_budget_bytes(config))
    save_config(config, folder)
    runnable = [t for t in trials if t.skipped_reason is None]
    fit_short_trials(config, runnable, console)
    for trial in trials:
        if trial.skipped_reason:
            console.print(f"skipping trial {trial.index} ({', '.join(trial.overrides)}): {trial.skipped_reason}",
                          markup=False, highlight=False)
    prepare_trial_data(config, runnable, console)
    with tracked_run(config, folder, console=console, kind="sweep") as tracking:
        grid = None
        if runnable:
            per_trial = config.scaling.num_workers * config.scaling.cpus_per_worker
            # Tune's own Ctrl-C handler returns a partial result grid that looks finished; let Ctrl-C raise
            # instead, so an interrupted sweep writes no results. Tune's saved state is what a re-run restores.
            os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
            try:
                with ray_session(min_cpus=2 * per_trial):
                    grid = _run_tuner(config, runnable, folder, console,
                                      tracking.parent_for_trials(config.run.name))
            except KeyboardInterrupt:
                console.print("sweep interrupted; run the same command again to resume it", markup=False,
                              highlight=False)
                raise
        rows = collect_rows(config, trials, grid, trials_dir(folder))
        best = write_outputs(config, rows, folder, console)
        track_outcome(config, tracking, rows, best, folder)
    return SweepOutcome(folder=folder, rows=rows, best=best)


def prepare_trial_data(config: JobConfig, runnable: list[Trial], console: Any) -> None:
    """Tokenize each distinct dataset of the trials once, before any trial starts, in the sweep's storage.

    Trials differ in what they train (rank, batch, learning rate), rarely in their rows; each finds its
    dataset prepared (``train/prepared.py``) and tokenizes nothing. Left to the trials, those running at
    once would each tokenize it."""
    import time

    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.prepared import prepare, prepared_root

    started, root = time.perf_counter(), prepared_root(config).uri
    tokenizers: dict[tuple, Any] = {}
    keys: dict[str, bool] = {}
    for trial in runnable:
        trial.config.data.prepared_root = trial.config.data.prepared_root or root
        model = trial.config.model
        source = (model.name_or_path, model.revision, model.trust_remote_code)
        if source not in tokenizers:
            tokenizers[source] = load_tokenizer(model.name_or_path, revision=model.revision,
                                                trust_remote_code=model.trust_remote_code)
        prepared, reused = prepare(trial.config, tokenizers[source])
        keys.setdefault(str(prepared.key), reused)
    if keys:
        tokenized = sum(not reused for reused in keys.values())
        console.print(f"sweep {config.run.name}: {len(runnable)} trial(s) on {len(keys)} prepared dataset(s) "
                      f"({tokenized} tokenized, {len(keys) - tokenized} reused) in "
                      f"{time.perf_counter() - started:.1f} s: {', '.join(keys)}", markup=False, highlight=False)


def track_outcome(config: JobConfig, tracking: Any, rows: list[dict], best: dict | None, folder: Location) -> None:
    """The sweep's own tracked run ends with its results table, how its trials ended, and the best one;
    the runs of trials Tune stopped are ended with the reason."""
    from collections import Counter

    from raytune_it.tracking import close_stopped_run
    from raytune_it.tune.results import STATUS_FAILED, STATUS_STOPPED

    if tracking.enabled:
        for row in rows:
            if row["status"] in (STATUS_STOPPED, STATUS_FAILED):
                close_stopped_run(config, trial_dir(folder, row["trial"]),
                                  "killed" if row["status"] == STATUS_STOPPED else "failed", row["reason"])

    counts = Counter(row["status"] for row in rows)
    values = {f"trials_{status.replace(' ', '_')}": count for status, count in counts.items()}
    tracking.log_outcome(values, prefix="sweep.", files={"results.csv": (folder / "results.csv").read_text()})
    if best is not None:
        tracking.log_outcome(best, prefix="best.", tags={"raytune_it.best_export": (folder / "best").uri})


#: A trial shorter than its eval interval is evaluated this many times instead.
SHORT_TRIAL_EVALS = 4


def fit_short_trials(config: JobConfig, runnable: list[Trial], console: Any) -> None:
    """Fit evaluation and ASHA's rungs to trials shorter than ``train.eval_every_steps``.

    ASHA compares trials on the eval loss they report at its rungs, and a trial reports one at every eval
    step; with ``train.max_steps=8`` and evaluation every 50 steps there would be one report, at the
    end, and a grace period of 50 is past the end (Ray refuses it). Such trials evaluate
    ``SHORT_TRIAL_EVALS`` times instead. An explicit ``tune.grace_period_steps`` longer than the shortest
    trial is a mistake, refused here, before Ray starts."""
    from raytune_it.errors import ConfigError

    capped = [(t, t.config.train.max_steps) for t in runnable if t.config.train.max_steps]
    shortest = min((steps for _, steps in capped), default=None)
    grace = config.tune.grace_period_steps
    if config.tune.scheduler == "asha" and grace and shortest and grace > shortest:
        raise ConfigError(f"tune.grace_period_steps: got {grace}, but the shortest trial runs {shortest} steps "
                          f"(train.max_steps); set it to at most {shortest}, or leave it unset")
    fitted = set()
    for trial, steps in capped:
        if trial.config.train.eval_every_steps > steps:
            every = max(1, -(-steps // SHORT_TRIAL_EVALS))
            trial.config = with_overrides(trial.config, {"train.eval_every_steps": every}, f"trial {trial.index}")
            fitted.add((steps, every))
    for steps, every in sorted(fitted):
        console.print(f"trials of {steps} steps evaluate every {every} steps (train.eval_every_steps is longer "
                      "than the trial)", markup=False, highlight=False)


def grace_period(config: JobConfig, runnable: list[Trial]) -> int:
    """ASHA's first rung: ``tune.grace_period_steps``, or else the first eval step every trial reaches."""
    return config.tune.grace_period_steps or max(t.config.train.eval_every_steps for t in runnable)


def _run_tuner(config: JobConfig, runnable: list[Trial], folder: Location, console: Any,
               tracking_parent: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trial_configs = {t.index: t.config.to_dict() for t in runnable}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trial_configs=trial_configs, trials_uri=trials_dir(folder).uri,
                             tracking_parent=tracking_parent),
        # The trial only drives its TorchTrainer; the workers reserve the real resources.
        {"CPU": 0.01},
    )
    # Past every trial's last step: at max_t ASHA stops a trial, which would cut off its export.
    max_steps = max(_total_steps_cap(t.config) for t in runnable) + 1
    scheduler: FIFOScheduler
    if config.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps,
                                  grace_period=grace_period(config, runnable),
                                  reduction_factor=config.tune.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tune_dir = folder / "tune"
    concurrency = config.tune.max_concurrent_trials or default_concurrency(config)
    console.print(f"sweep {config.run.name}: {len(runnable)} trial(s), up to {concurrency} at once, "
                  f"scheduler {config.tune.scheduler}, folder {folder.uri}", markup=False, highlight=False)
    if tune.Tuner.can_restore(tune_dir.path, storage_filesystem=tune_dir.filesystem):
        console.print("resuming the interrupted sweep", markup=False, highlight=False)
        tuner = tune.Tuner.restore(tune_dir.path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=tune_dir.filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.index for t in runnable])},
            tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="tune", storage_path=folder.path, storage_filesystem=folder.filesystem,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=1 if os.environ.get("RAYTUNE_IT_TUNE_VERBOSE") else 0),
        )
    return tuner.fit()


def _total_steps_cap(config: JobConfig) -> int:
    return config.train.max_steps or 10**9

