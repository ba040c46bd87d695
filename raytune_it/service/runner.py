"""Where a fine-tuning job runs: a Ray Job of ``raytune-it train``, through Ray's JobSubmissionClient.

A Ray Job outlives the Serve replica that submitted it, shows in the dashboard, waits for its server type
(the autoscaler adds nodes) and writes its run folder in storage. Each attempt of a job (a resume after a
pause is a new attempt) is the submission id ``<job id>-<attempt>``: Ray refuses a second submission under
one id, so two replicas reconciling the same job cannot start it twice.

Inside the cluster the client finds the dashboard on its own (the node's web UI address) and sends the
cluster's token when token authentication is on (Ray reads it from RAY_AUTH_TOKEN or its token file).
"""

from __future__ import annotations

import shlex
from typing import Any

#: Ray's job states, as this service reads them.
ACTIVE, SUCCEEDED, FAILED, STOPPED = ("PENDING", "RUNNING"), "SUCCEEDED", "FAILED", "STOPPED"
VANISHED = "VANISHED"
LOG_TAIL = 4000


class RayJobs:
    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    @staticmethod
    def entrypoint(config_uri: str) -> str:
        """``python`` on the job's node, where raytune-it is installed as on every node of the cluster."""
        return shlex.join(["python", "-m", "raytune_it", "train", config_uri])

    def submit(self, submission_id: str, config_uri: str, metadata: dict[str, str]) -> None:
        """Start the attempt; an attempt Ray already has (another replica started it) is left as it is."""
        if self.status(submission_id) != VANISHED:
            return
        self.client().submit_job(entrypoint=self.entrypoint(config_uri), submission_id=submission_id,
                                 metadata=metadata)

    def status(self, submission_id: str) -> str:
        """Ray's status of the attempt, or VANISHED where Ray has no such job (its cluster was replaced, or
        someone deleted it). Other failures to reach Ray raise: the caller tries again later."""
        try:
            return str(self.client().get_job_status(submission_id).value)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return VANISHED
            raise

    def stop(self, submission_id: str) -> None:
        try:
            self.client().stop_job(submission_id)
        except RuntimeError as exc:
            if "404" not in str(exc) and "does not exist" not in str(exc):
                raise

    def failure(self, submission_id: str) -> str:
        """Why the attempt failed, in the words a user can act on: the CLI's ``error:`` line if it printed one
        (a bad config or data), else Ray's message and the log's last lines."""
        try:
            logs = self.client().get_job_logs(submission_id)
        except Exception:  # noqa: BLE001 - the reason is a nicety; the status is what matters
            logs = ""
        errors = [line[len("error: "):] for line in logs.splitlines() if line.startswith("error: ")]
        if errors:
            return errors[-1]
        try:
            message = self.client().get_job_info(submission_id).message or ""
        except Exception:  # noqa: BLE001
            message = ""
        tail = logs.strip().splitlines()[-1:] if logs.strip() else []
        return " ".join([message, *tail]).strip()[-LOG_TAIL:] or "the Ray job failed (see its log in the dashboard)"
