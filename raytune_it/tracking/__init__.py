"""Experiment tracking: a run's config, every step's metrics, its summary and export, in MLflow or W&B.

The driver logs, never the workers. It already holds all a tracker needs: the config before Ray
starts, every step as the progress queue brings it, the summary at the end. So workers need neither
the tracking server's address nor its credentials, and a lost worker loses no metric. A sweep's
trials are drivers too (one per Tune trial), each logging a run of its own under the sweep's run.

The tracked run's id is kept in the run folder (``tracking.json``): running the same run.name
again resumes the run and continues its tracked run. A tracker that fails mid-run warns once and
sends the steps again at its next try: training never stops for a tracker. One that cannot start
stops the job before Ray starts, saying how to fix it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Protocol

from raytune_it.config.schema import JobConfig
from raytune_it.errors import UserError
from raytune_it.storage import Location
from raytune_it.tracking.record import outcome_metrics, run_params, step_metrics

TRACKING_FILE = "tracking.json"
Kind = Literal["train", "sweep", "trial"]
#: Steps kept for a tracker that is down, at most; older ones are dropped (metrics.jsonl keeps them all).
MAX_PENDING_STEPS = 100_000


class TrackerBackend(Protocol):
    """One tracked run in one tracking library (``MlflowBackend``, ``WandbBackend``)."""

    label: str
    run_id: str

    @property
    def address(self) -> str:
        """Where a person finds the run: its page, or its folder for an offline run."""

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None: ...

    def log_outcome(self, metrics: dict[str, float], tags: dict[str, str], files: dict[str, str],
                    step: int) -> None: ...

    def end(self, status: str) -> None: ...


@dataclass(frozen=True)
class Parent:
    """A sweep's tracked run, which its trials' runs are nested under (MLflow) or grouped by (W&B)."""

    run_id: str
    name: str


class TrackedRun:
    """What a driver logs to: a backend run (or none) behind a guard that never lets tracking stop a job."""

    def __init__(self, backend: TrackerBackend | None, console: Any) -> None:
        self.backend = backend
        self.console = console
        self.last_step = 0
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def parent_for_trials(self, name: str) -> Parent | None:
        return Parent(self.backend.run_id, name) if self.backend is not None else None

    def log_steps(self, items: list[dict]) -> None:
        """Metrics lines as the progress monitor keeps them (``metrics.jsonl``)."""
        if self.backend is None or not items:
            return
        self._pending.extend((item["step"], step_metrics(item)) for item in items)
        self._pending = self._pending[-MAX_PENDING_STEPS:]
        self.last_step = max(self.last_step, *(item["step"] for item in items))
        self._send_pending()

    def log_outcome(self, values: dict[str, Any], *, prefix: str = "summary.", tags: dict[str, str] | None = None,
                    files: dict[str, str] | None = None) -> None:
        """The numbers a run ends with (its summary, a sweep's best trial), with its files (summary.json)."""
        backend = self.backend
        if backend is None:
            return
        self._send_pending()
        self._guard(lambda: backend.log_outcome(outcome_metrics(values, prefix), tags or {}, files or {},
                                                self.last_step))

    def end(self, status: Literal["finished", "failed", "killed"]) -> None:
        backend = self.backend
        if backend is None:
            return
        if self._guard(lambda: backend.end(status)) and status == "finished":
            self.console.print(f"tracking: logged to {backend.label} {backend.address}", markup=False,
                               highlight=False)

    def _send_pending(self) -> None:
        """The steps not yet taken (all of them, after a failed try), in one go."""
        backend = self.backend
        if backend is not None and self._pending and self._guard(lambda: backend.log_steps(self._pending)):
            self._pending = []

    def _guard(self, call: Callable[[], None]) -> bool:
        try:
            call()
            return True
        except Exception as exc:  # a tracking server that went away must never stop training
            if not self._warned:
                self._warned = True
                label = self.backend.label if self.backend is not None else "the tracker"
                self.console.print(f"warning: {label} did not take the run's metrics ({_cause(exc)}); "
                                   "training goes on, and they are sent again at the next try (metrics.jsonl in "
                                   "the run folder has them all)", style="yellow", markup=False, highlight=False)
            return False


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _saved_run_id(config: JobConfig, run_dir: Location) -> str | None:
    """The run id an earlier attempt of this run logged to, if it logged to the same place."""
    path = run_dir / TRACKING_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    settings = config.tracking
    same = (saved.get("backend"), saved.get("uri"), saved.get("experiment")) == (
        settings.backend, settings.uri, settings.experiment)
    return saved.get("run_id") if same else None


def _open_backend(config: JobConfig, run_dir: Location, kind: Kind, parent: Parent | None,
                  run_id: str | None) -> TrackerBackend:
    settings = config.tracking
    name = f"{parent.name}/{config.run.name}" if parent else config.run.name
    tags = {"raytune_it.kind": kind, "raytune_it.run_dir": run_dir.uri}
    if kind != "sweep":
        tags["raytune_it.export"] = (run_dir / "export").uri
    common: dict[str, Any] = dict(uri=settings.uri, experiment=settings.experiment, run_name=name, run_id=run_id,
                                  params=run_params(config), tags=tags)
    if settings.backend == "mlflow":
        from raytune_it.tracking.mlflow_backend import MlflowBackend

        return MlflowBackend(parent_id=parent.run_id if parent else None, **common)
    from raytune_it.tracking.wandb_backend import WandbBackend

    # Offline runs land in the run folder (wandb/ beside checkpoints/) unless WANDB_DIR says where.
    folder = run_dir.path if run_dir.is_local and not os.environ.get("WANDB_DIR") else None
    return WandbBackend(group=parent.name if parent else None, job_type=kind, folder=folder, **common)


def start_run(config: JobConfig, run_dir: Location, *, console: Any, kind: Kind,
              parent: Parent | None = None) -> TrackedRun:
    """Open (or, for a resumed run, continue) the tracked run of ``run_dir``; before Ray starts."""
    settings = config.tracking
    if settings.backend == "none":
        return TrackedRun(None, console)
    package = {"mlflow": "mlflow", "wandb": "wandb"}[settings.backend]
    where = f"tracking.uri={settings.uri}" if settings.uri else "the library's default tracking URI"
    try:
        backend = _open_backend(config, run_dir, kind, parent, _saved_run_id(config, run_dir))
    except ImportError as exc:
        raise UserError(f"tracking.backend={settings.backend} needs the {package} package ({_cause(exc)}): "
                        "pip install 'raytune-it[trackers]', or set tracking.backend=none") from None
    except Exception as exc:
        raise UserError(f"tracking.backend={settings.backend}: could not start a run at {where} "
                        f"(experiment {settings.experiment!r}): {_cause(exc)}. Start the tracking server or fix "
                        "tracking.uri and its credentials, or set tracking.backend=none.") from None
    (run_dir / TRACKING_FILE).write_text(json.dumps({
        "backend": settings.backend, "uri": settings.uri, "experiment": settings.experiment,
        "run_id": backend.run_id, "address": backend.address}, indent=2))
    console.print(f"tracking: {backend.label} {backend.address}", markup=False, highlight=False)
    return TrackedRun(backend, console)


def close_stopped_run(config: JobConfig, run_dir: Location, status: Literal["failed", "killed"],
                      reason: str) -> None:
    """End the tracked run of a sweep trial that Tune stopped (ASHA) or lost, with the reason.

    Tune ends such a trial by ending its process, so the trial never ends its tracked run itself, and
    MLflow would show it running forever. W&B marks a run whose process is gone as crashed by itself."""
    if config.tracking.backend != "mlflow":
        return
    run_id = _saved_run_id(config, run_dir)
    if run_id is None:
        return
    from raytune_it.tracking.mlflow_backend import end_stopped_run

    with contextlib.suppress(Exception):  # the sweep's results never wait on, or fail for, a tracker
        end_stopped_run(config.tracking.uri, run_id, status, reason)


@contextlib.contextmanager
def tracked_run(config: JobConfig, run_dir: Location, *, console: Any, kind: Kind,
                parent: Parent | None = None) -> Iterator[TrackedRun]:
    """A tracked run ended with the job: finished, failed (an error) or killed (Ctrl-C)."""
    run = start_run(config, run_dir, console=console, kind=kind, parent=parent)
    try:
        yield run
    except KeyboardInterrupt:
        run.end("killed")
        raise
    except BaseException:
        run.end("failed")
        raise
    run.end("finished")
