"""``raytune-it train``: one Ray Train job from a validated config to a run folder.

config -> preflight checks (no worker yet) -> run folder with config.yaml ->
the tracked run, if any -> tokenized data in the object store -> TorchTrainer on
the server type's resource -> progress while it runs -> summary.json and the export.

The run folder ``run.storage/run.name/`` holds ``config.yaml``, ``dataset.json``
(the key of the prepared dataset it trains on, shared in ``run.storage/_prepared/``:
``prepared.py``), ``checkpoints/`` (Ray Train's, best N by eval loss), ``metrics.jsonl`` (every
step), ``summary.json``, ``export/`` and, with ``tracking.backend`` set,
``tracking.json`` (the tracked run's id). It is a local folder or a storage URI
(``raytune_it.storage``): the driver and the workers reach it through the same
pyarrow filesystem, so no node needs another's disk. Running again with the same
name resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from raytune_it.config.loading import flatten, load_run_config, save_config
from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError
from raytune_it.hardware import SERVER_TYPES
from raytune_it.storage import Location, check_writable, open_location
from raytune_it.train.state import StepPlan
from raytune_it.train.summary import SUMMARY_FILE, RunSummary, build_summary, print_summary

#: Keys that may differ when a run is resumed; anything else changes what is being trained.
RESUMABLE_CHANGES = {"train.max_steps", "train.eval_every_steps", "run.storage", "run.keep_checkpoints",
                     "run.max_failures", "scaling.placement_timeout_s", "train.epochs", "data.prepared_root"}


def run_dir_of(config: JobConfig) -> Location:
    return open_location(config.run.storage) / config.run.name


#: What else a resumed sweep may change: how many trials run at once. Its search (space, kind, samples, seed,
#: memory budget) decides which trial number is which values, and its scheduler which trials are stopped.
SWEEP_RESUMABLE_CHANGES = {"tune.max_concurrent_trials"}


def check_resume_compatible(config: JobConfig, run_dir: Location, *, sweep: bool = False) -> None:
    """Refuse a re-run of a run's (or, with ``sweep``, a sweep's) name whose config changed what it trains: a
    re-run resumes, and would mix two jobs in one folder."""
    previous_path = run_dir / "config.yaml"
    if not previous_path.is_file():
        return
    previous = load_run_config(previous_path)
    before, now = flatten(previous.to_dict()), flatten(config.to_dict())
    # Sections a training run never reads: how it is served, tracked, evaluated, generated from or staged.
    ignored = ("serve.", "tracking.", "eval.", "generate.", "e2e.") + (() if sweep else ("tune.",))
    allowed = RESUMABLE_CHANGES | SWEEP_RESUMABLE_CHANGES if sweep else RESUMABLE_CHANGES
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)
                     and k not in allowed and not k.startswith(ignored))
    if changed:
        raise ConfigError(
            f"{'sweep' if sweep else 'run'} {config.run.name!r} already exists in {run_dir.parent.uri} with a "
            f"different config ({', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed)}). "
            "Re-running a name resumes it; choose another run.name for a new "
            f"{'sweep' if sweep else 'run'}.")
    check_schedule_kept(previous, config, run_dir)


def check_schedule_kept(previous: JobConfig, config: JobConfig, run_dir: Location) -> None:
    """A resumed run keeps the length of its learning-rate schedule.

    The warmup and decay are functions of the total steps, and a checkpointed scheduler stores only its
    position: a resume with another ``train.max_steps`` or ``train.epochs`` would rebuild the schedule
    mid-run (a cosine past its end even climbs again). A constant schedule does not depend on the length."""
    from raytune_it.train.checkpoints import latest_checkpoint_step
    from raytune_it.train.prepared import recorded_dataset

    if config.train.lr_schedule == "constant" or latest_checkpoint_step(run_dir) is None:
        return
    prepared = recorded_dataset(config, run_dir)
    if prepared is None:
        return
    rows = prepared.train_rows
    before, now = plan_steps(previous, rows).total_steps, plan_steps(config, rows).total_steps
    if before != now:
        raise ConfigError(
            f"run {config.run.name!r} was started for {before} steps and this config asks for {now} "
            f"(train.max_steps: {previous.train.max_steps} -> {config.train.max_steps}, train.epochs: "
            f"{previous.train.epochs} -> {config.train.epochs}). Its {config.train.lr_schedule} learning-rate "
            f"schedule is built for {before} steps and would change mid-run. Resume with the same "
            "train.max_steps and train.epochs, or start a new run.name (train.lr_schedule=constant may change them).")


def interrupted_message(config: JobConfig, run_dir: Location) -> str:
    """What a Ctrl-C leaves: where the run stopped and how to continue it."""
    from raytune_it.train.checkpoints import latest_checkpoint_step

    step = latest_checkpoint_step(run_dir)
    where = f"from its checkpoint at step {step}" if step else "from the start (no checkpoint was written yet)"
    return (f"training interrupted. Run the same command again (run.name={config.run.name}, run.storage="
            f"{run_dir.parent.uri}) to resume {where}.")


def plan_steps(config: JobConfig, train_rows: int) -> StepPlan:
    per_step = config.train.micro_batch_size * config.train.gradient_accumulation_steps
    rows_per_worker = train_rows // config.scaling.num_workers
    steps_per_epoch = rows_per_worker // per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.micro_batch_size x train.gradient_accumulation_steps x scaling.num_workers = "
            f"{per_step * config.scaling.num_workers} sequences per step, but the training split has only "
            f"{train_rows}. Lower the batch size or the number of workers, or add data.")
    total = steps_per_epoch * config.train.epochs
    return StepPlan(steps_per_epoch=steps_per_epoch, total_steps=min(total, config.train.max_steps or total))


def memory_warning(config: JobConfig) -> str | None:
    """The planner's verdict for the configured server type, before anything launches."""
    from raytune_it.plan.planner import config_fit_problem

    problem = config_fit_problem(config)
    return f"this job {problem}" if problem else None


def read_history(metrics_path: Location) -> list[dict]:
    """Every step's metrics; a step reported twice (re-run after a restart) keeps its latest."""
    if not metrics_path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            by_step[item["step"]] = item
    return [by_step[step] for step in sorted(by_step)]


def progress_queue() -> Any:
    """The queue workers report every step through, on the driver's own node. A zero-CPU actor left to the
    scheduler can land on a worker node, which the autoscaler may release as idle or lose mid-run, and
    the steps after that would never reach metrics.jsonl or the summary."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})


def worker_resources(config: JobConfig) -> dict[str, float]:
    """One Ray Train worker's resources: its CPUs, a GPU, and one unit of its server type."""
    resources: dict[str, float] = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = 1
    if config.scaling.server_type != "any":
        resources[SERVER_TYPES[config.scaling.server_type].resource] = 1
    return resources


def worker_bundles(config: JobConfig) -> list[dict[str, float]]:
    return [worker_resources(config)] * config.scaling.num_workers


def scaling_config(config: JobConfig) -> Any:
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                         resources_per_worker=worker_resources(config))


def train(config: JobConfig, *, console: Any = None, callbacks: list | None = None,
          tracking_parent: Any = None) -> RunSummary:
    """Run (or resume) one training job and return its summary.

    ``callbacks`` are Ray Train ``UserCallback``s (a sweep passes Tune's report callback);
    ``tracking_parent`` is the sweep's tracked run, for a trial's (``raytune_it.tracking.Parent``).
    """
    from rich.console import Console

    from raytune_it.models.loading import load_tokenizer
    from raytune_it.tracking import tracked_run
    from raytune_it.train.preflight import preflight
    from raytune_it.train.prepared import prepare_for_run

    console = console or Console()
    run_dir = run_dir_of(config)
    check_writable(run_dir.parent)  # unreachable, missing bucket, no permission: now, not in a worker
    preflight(config)
    warning = memory_warning(config)
    if warning:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
    check_resume_compatible(config, run_dir)
    save_config(config, run_dir)
    tokenizer = load_tokenizer(config.model.name_or_path, revision=config.model.revision,
                               trust_remote_code=config.model.trust_remote_code)
    kind: Literal["trial", "train"] = "trial" if tracking_parent else "train"
    with tracked_run(config, run_dir, console=console, kind=kind, parent=tracking_parent) as tracking:
        with console.status("preparing the dataset") as status:
            prepared, reused = prepare_for_run(
                config, tokenizer, run_dir,
                on_records=lambda read: status.update(f"tokenizing the dataset: {read:,} records read"))
        plan = plan_steps(config, prepared.train_rows)
        console.print(f"run {config.run.name}: {prepared.train_rows:,} train / {prepared.eval_rows:,} eval "
                      f"sequences ({'reused' if reused else 'tokenized'}: dataset {prepared.key or 'of the run'}), "
                      f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
                      f"{config.scaling.num_workers} worker(s), folder {run_dir.uri}", markup=False, highlight=False)
        started = time.perf_counter()
        _fit(config, run_dir, prepared, plan, console, callbacks or [], tracking.log_steps)
        history = read_history(run_dir / "metrics.jsonl")
        summary = build_summary(config, history, plan.steps_per_epoch, time.perf_counter() - started,
                                (run_dir / "export").uri)
        summary.dataset = prepared.key
        summary.write(run_dir)
        tracking.log_outcome(summary.to_dict(), files={SUMMARY_FILE: summary.to_json()})
        print_summary(summary, console)
    return summary


def _fit(config: JobConfig, run_dir: Location, prepared: Any, plan: StepPlan, console: Any, callbacks: list,
         on_steps: Any) -> None:
    """The Ray part of a run: its TorchTrainer, with every step's metrics kept as they come."""
    from raytune_it.cluster import ray_session, wait_for_resources, warn_if_storage_is_not_shared
    from raytune_it.train.prepared import split_sources

    with ray_session(min_cpus=config.scaling.num_workers * config.scaling.cpus_per_worker):
        import ray.train
        from ray.train.torch import TorchTrainer

        from raytune_it.train.loop import train_loop
        from raytune_it.train.process_group import BoundTorchConfig
        from raytune_it.train.progress import ProgressMonitor

        warn_if_storage_is_not_shared(run_dir, console)
        wait_for_resources(worker_bundles(config), config.scaling.server_type, config.scaling.placement_timeout_s)
        queue = progress_queue()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config": config.to_dict(), "plan": plan.__dict__, "progress": queue,
                "export": run_dir / "export", "splits": split_sources(prepared, config.data, console),
            },
            scaling_config=scaling_config(config),
            torch_config=BoundTorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name="checkpoints",
                storage_path=run_dir.path,
                storage_filesystem=run_dir.filesystem,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=config.run.keep_checkpoints, checkpoint_score_attribute="eval_loss",
                    checkpoint_score_order="min"),
                failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
                callbacks=callbacks,
            ),
        )
        try:
            with ProgressMonitor(queue, plan.total_steps, run_dir / "metrics.jsonl", console, on_steps=on_steps):
                trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            # Ray Train's own Ctrl-C handler aborts the run, and the wait for it then ends in SystemExit.
            console.print(interrupted_message(config, run_dir), style="yellow", markup=False, highlight=False)
            raise KeyboardInterrupt from None
