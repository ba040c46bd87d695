"""MLflow, through its own ``MlflowClient``: explicit runs by id, no process-global active run.

The client API (not ``mlflow.start_run``) lets one process hold a sweep's run and a trial's at once,
and logs nothing the config does not say: no source file, no command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any

#: MLflow retries a failed request 7 times with doubling waits (minutes in all), meant for servers that
#: rate-limit. A run start that cannot reach the server should fail in seconds, and a server lost mid-run
#: should not hold the progress thread for minutes; a user's own setting wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: Most parameters and metrics MLflow takes in one ``log_batch`` call.
PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000
#: MLflow keeps parameter values up to this length; a longer one (a long list) is cut, saying so.
MAX_PARAM_LENGTH = 6000
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def param_text(value: Any) -> str:
    """A config value as an MLflow parameter: text, JSON for anything but a string."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 14] + "... (cut off)"


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class MlflowBackend:
    label = "MLflow"

    def __init__(self, *, uri: str | None, experiment: str, run_name: str, run_id: str | None,
                 params: dict[str, Any], tags: dict[str, str], parent_id: str | None) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = self.client.tracking_uri
        self.experiment_id = self._experiment(experiment)
        if parent_id:
            tags = dict(tags, **{"mlflow.parentRunId": parent_id})
        earlier = self._active_run(run_id) if run_id else None
        self.run_id: str
        if run_id is not None and earlier is not None:  # a resumed run continues its tracked run; parameters
            self.run_id = run_id                          # are kept as first logged
            self.client.update_run(run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in earlier.data.params}
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        from mlflow.entities import Param, RunTag

        for chunk in _chunks([Param(k, param_text(v)) for k, v in params.items()], PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=chunk)
        if earlier is not None:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another trial created it in between
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _active_run(self, run_id: str) -> Any:
        """The run a resumed job logged to, if it is still there (not deleted since) to continue."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    @property
    def address(self) -> str:
        if not self.uri.startswith(("http://", "https://")):
            return f"run {self.run_id} at {self.uri}"
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in steps for key, value in values.items()]
        for chunk in _chunks(metrics, METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_outcome(self, metrics: dict[str, float], tags: dict[str, str], files: dict[str, str],
                    step: int) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        for name, text in files.items():
            self.client.log_text(self.run_id, text, name)

    def end(self, status: str) -> None:
        _terminate(self.client, self.run_id, status)


def _terminate(client: Any, run_id: str, status: str) -> None:
    # MLflow writes the run's address to stdout itself; the driver prints it once, on its console (a
    # sweep trial's is silent, where MLflow's lines would come back through Ray's log forwarding).
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, STATUSES[status])


def end_stopped_run(uri: str | None, run_id: str, status: str, reason: str) -> None:
    """End a run its own process could not end (its process was stopped), if it is still running."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "raytune_it.stopped", reason)
        _terminate(client, run_id, status)
