"""The fine-tuning service behind the HTTP routes: files, jobs and their lifecycle, for one organization at
a time. Every method takes the caller's organization, and another organization's object is a 404.

A job's status moves ``validating_files`` -> ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` |
``cancelled`` (and ``running`` <-> ``paused``). ``reconcile`` moves it: it starts queued jobs in FIFO order
while fewer than ``serve.max_running_jobs`` run, and reads each running job's Ray status. It runs on every
read of a job and every few seconds in the ingress, from the documents in storage alone, so a restarted app
picks up where the last one stopped.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from pydantic import ValidationError

from raytune_it.config.schema import JobConfig
from raytune_it.errors import request_problem
from raytune_it.service import events as run_events
from raytune_it.service.errors import ApiError, not_found
from raytune_it.service.files import content_chunks, create_file, public, save_result_file
from raytune_it.service.job_request import JobRequest, build_job_config, planned_seconds
from raytune_it.service.names import FineTunedName, parse_fine_tuned
from raytune_it.service.runner import ACTIVE, FAILED, STOPPED, SUCCEEDED, VANISHED, RayJobs
from raytune_it.service.store import ServiceStore, new_id, now
from raytune_it.storage import is_published

TERMINAL = ("succeeded", "failed", "cancelled")
PUBLIC_KEYS = ("id", "object", "created_at", "finished_at", "model", "fine_tuned_model", "organization_id",
               "status", "hyperparameters", "training_file", "validation_file", "result_files", "trained_tokens",
               "error", "seed", "estimated_finish", "integrations", "metadata", "method", "user_provided_suffix")
MAX_PAGE = 100


def page(items: list[dict[str, Any]], after: str | None, limit: int | None) -> dict[str, Any]:
    """OpenAI's cursor paging over items already in their order: those after the id ``after``."""
    limit = min(max(int(limit or 20), 1), MAX_PAGE)
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def validation_error(exc: ValidationError) -> ApiError:
    param, message = request_problem(exc.errors())
    return ApiError(400, message, "invalid_request", param)


class FineTuningService:
    def __init__(self, template: JobConfig, base_name: str, ray_address: str | None = None) -> None:
        self.template = template
        self.base_name = base_name
        self.store = ServiceStore(template.run.storage)
        self.max_running = template.serve.max_running_jobs
        self.ray = RayJobs(ray_address)
        self._lock = threading.Lock()  # one replica's requests and its reconcile loop change a job in turn

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    # --- files ------------------------------------------------------------------------------------

    async def upload(self, organization: str, chunks: Any, content_type: str, limit: int) -> dict[str, Any]:
        return public(await create_file(self.store, organization, chunks, content_type, limit))

    def _file(self, organization: str, file_id: str, param: str = "file_id") -> dict[str, Any]:
        document = self.store.file(file_id) if file_id.startswith("file-") else None
        if document is None or document.get("organization") != organization:
            raise not_found("file", file_id, param)
        return document

    def list_files(self, organization: str, purpose: str | None, after: str | None, limit: int | None,
                   order: str = "desc") -> dict[str, Any]:
        files = [f for f in self.store.files() if f.get("organization") == organization
                 and (purpose is None or f.get("purpose") == purpose)]
        files.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order != "asc")
        return page([public(f) for f in files], after, limit)

    def get_file(self, organization: str, file_id: str) -> dict[str, Any]:
        return public(self._file(organization, file_id))

    def file_content(self, organization: str, file_id: str) -> Iterator[bytes]:
        return content_chunks(self.store, self._file(organization, file_id))

    def delete_file(self, organization: str, file_id: str) -> dict[str, Any]:
        self._file(organization, file_id)
        self.store.file_folder(file_id).delete()
        return {"id": file_id, "object": "file", "deleted": True}

    # --- jobs -------------------------------------------------------------------------------------

    def _job(self, organization: str, job_id: str) -> dict[str, Any]:
        document = self.store.job(job_id) if job_id.startswith("ftjob-") else None
        if document is None or document.get("organization_id") != organization:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return document

    @staticmethod
    def _event(job: dict[str, Any], message: str, level: str = "info", **data: Any) -> None:
        job["_events"].append(run_events.message_event(job["id"], len(job["_events"]) + 1, now(), message, level,
                                                       data))

    def _data(self, organization: str, file_id: str, param: str) -> dict[str, Any]:
        document = self._file(organization, file_id, param)
        if document["purpose"] != "fine-tune":
            raise ApiError(400, f"{param}: {file_id} was not uploaded with purpose fine-tune", "invalid_request",
                           param)
        return document

    def create_job(self, organization: str, body: dict[str, Any]) -> dict[str, Any]:
        from raytune_it.config.loading import save_config
        from raytune_it.service.files import data_location

        try:
            request = JobRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if request.model != self.base_name:
            raise ApiError(404, f"model {request.model!r} cannot be fine-tuned here; this app tunes "
                                f"{self.base_name!r}", "model_not_found", "model")
        training = self._data(organization, request.training_file, "training_file")
        validation = (self._data(organization, request.validation_file, "validation_file")
                      if request.validation_file else None)
        if validation is not None and validation["format"] != training["format"]:
            raise ApiError(400, f"validation_file is in the {validation['format']} format and training_file in "
                                f"{training['format']}; give both in one format", "invalid_request",
                           "validation_file")
        job_id = new_id("ftjob")
        data = {"path": data_location(self.store, training).uri, "format": training["format"],
                "file_type": training["file_type"],
                "eval_path": data_location(self.store, validation).uri if validation else None}
        config, hyperparameters = build_job_config(
            self.template, request, base_model=self.template.serve.base_model, data=data,
            run_storage=self.store.runs().uri, job_id=job_id, records=training["records"])
        created = now()
        planned = planned_seconds(config, training["records"])
        job = {"id": job_id, "object": "fine_tuning.job", "created_at": created, "finished_at": None,
               "model": request.model, "fine_tuned_model": None, "organization_id": organization,
               "status": "validating_files", "hyperparameters": hyperparameters,
               "training_file": request.training_file, "validation_file": request.validation_file,
               "result_files": [], "trained_tokens": None, "error": None,
               "seed": config.train.seed, "estimated_finish": int(created + planned) if planned else None,
               "integrations": [], "metadata": request.metadata,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
               "user_provided_suffix": request.suffix,
               "_method": config.method, "_attempt": 0, "_events": [], "_started_at": None,
               "_config": str((self.store.job_folder(job_id) / "config.yaml").uri)}
        self._event(job, f"Created fine-tuning job: {job_id}")
        save_config(config, self.store.job_folder(job_id))
        # The files were checked record by record at upload, as training reads them.
        self._event(job, "Validated training file" + (" and validation file" if validation else "") +
                    f": {training['records']} records ({training['format']})")
        job["status"] = "queued"
        self._event(job, "Job queued; it starts when fewer than serve.max_running_jobs "
                         f"({self.max_running}) jobs run")
        self.store.save_job(job)
        self._reconcile_now()
        return self.public(self.store.job(job_id) or job)

    def public(self, job: dict[str, Any]) -> dict[str, Any]:
        return {key: job.get(key) for key in PUBLIC_KEYS}

    def list_jobs(self, organization: str, after: str | None, limit: int | None) -> dict[str, Any]:
        jobs = sorted((j for j in self.store.jobs() if j.get("organization_id") == organization),
                      key=lambda j: (j["created_at"], j["id"]), reverse=True)
        return page([self.public(j) for j in jobs], after, limit)

    def get_job(self, organization: str, job_id: str) -> dict[str, Any]:
        job = self._job(organization, job_id)
        if job["status"] not in TERMINAL:
            self._reconcile_now()
            job = self._job(organization, job_id)
        return self.public(job)

    def _submission(self, job: dict[str, Any], attempt: int | None = None) -> str:
        return f"{job['id']}-{job['_attempt'] if attempt is None else attempt}"

    def _finish(self, job: dict[str, Any], status: str, message: str, level: str = "info") -> None:
        job["status"], job["finished_at"] = status, now()
        job["estimated_finish"] = None
        self._event(job, message, level)

    def cancel(self, organization: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(organization, job_id)
            if job["status"] in TERMINAL:
                raise ApiError(400, f"the job is already {job['status']}", "job_not_cancellable", "fine_tuning_job_id")
            if job["status"] == "running":
                self._stop(job)
            self._finish(job, "cancelled", "Fine-tuning job cancelled")
            self.store.save_job(job)
        self._reconcile_now()
        return self.public(job)

    def pause(self, organization: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(organization, job_id)
            if job["status"] != "running":
                raise ApiError(400, f"only a running job can be paused; this one is {job['status']}",
                               "job_not_pausable", "fine_tuning_job_id")
            self._stop(job)
            job["status"], job["estimated_finish"] = "paused", None
            self._event(job, "Fine-tuning job paused; resume continues from its last checkpoint")
            self.store.save_job(job)
        self._reconcile_now()
        return self.public(job)

    def resume(self, organization: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(organization, job_id)
            if job["status"] != "paused":
                raise ApiError(400, f"only a paused job can be resumed; this one is {job['status']}",
                               "job_not_resumable", "fine_tuning_job_id")
            job["status"] = "queued"
            self._event(job, "Fine-tuning job resumed; queued")
            self.store.save_job(job)
        self._reconcile_now()
        return self.public(self._job(organization, job_id))

    def fine_tuned(self, job: dict[str, Any]) -> FineTunedName:
        return FineTunedName(self.base_name, job["organization_id"], job.get("user_provided_suffix") or "", job["id"])

    def events(self, organization: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        job = self._job(organization, job_id)
        run = self.store.run_folder(job_id)
        listed = run_events.checkpoints(self._started(job), run, str(self.fine_tuned(job)))
        items = [*job["_events"], *run_events.metrics_events(self._started(job), run),
                 *run_events.checkpoint_events(job, listed)]
        items.sort(key=lambda e: (e["created_at"], e["id"]), reverse=True)
        return page(items, after, limit)

    def checkpoints(self, organization: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        job = self._job(organization, job_id)
        return page(run_events.checkpoints(self._started(job), self.store.run_folder(job_id),
                                           str(self.fine_tuned(job))), after, limit)

    @staticmethod
    def _started(job: dict[str, Any]) -> dict[str, Any]:
        return {**job, "started_at": job.get("_started_at")}

    # --- models -----------------------------------------------------------------------------------

    def models(self, organization: str) -> list[dict[str, Any]]:
        return [{"id": j["fine_tuned_model"], "object": "model", "created": j["finished_at"],
                 "owned_by": organization, "root": self.base_name, "parent": self.base_name}
                for j in self.store.jobs() if j.get("organization_id") == organization
                and j.get("status") == "succeeded" and j.get("fine_tuned_model")]

    def servable(self, organization: str, model: str) -> str | None:
        """The job id behind a fine-tuned model the caller may use; None where the name is not one. A 404 for
        another organization's model or one that does not exist, a 400 for a full-tuning model."""
        name = parse_fine_tuned(model)
        if name is None:
            return None
        missing = ApiError(404, f"model {model!r} does not exist", "model_not_found", "model")
        if name.organization != organization:
            raise missing
        job = self.store.job(name.job_id)
        if job is None or job.get("organization_id") != organization or job.get("fine_tuned_model") != model:
            raise missing
        if job.get("_method") == "full":
            export = (self.store.run_folder(job["id"]) / "export").uri
            raise ApiError(400, f"{model} is a full-tuning model: this app serves adapters on its base; serve the "
                                f"model itself with raytune-it serve serve.base_model={export}",
                           "model_not_servable", "model")
        return name.job_id

    # --- the lifecycle ----------------------------------------------------------------------------

    def _reconcile_now(self) -> None:
        """After a request: start what may start, read what ended. Ray out of reach for a moment (a head just
        up whose job agent is not ready yet, a restarting dashboard) is not the client's error: the jobs stay as
        saved, and the ingress's loop tries again within seconds."""
        try:
            self.reconcile()
        except Exception:  # noqa: BLE001 - the saved state is whole; the next reconcile carries on from it
            logging.getLogger("ray.serve").warning("fine-tuning jobs: could not reach Ray; trying again shortly",
                                                   exc_info=True)

    def _stop(self, job: dict[str, Any]) -> None:
        try:
            self.ray.stop(self._submission(job))
        except Exception as exc:  # noqa: BLE001 - said to the client, who may try again
            raise ApiError(503, f"could not reach the Ray cluster to stop Ray Job {self._submission(job)} ({exc}); "
                                "try again", "ray_unavailable") from None

    def reconcile(self) -> None:
        """Bring every unfinished job up to date with Ray, then start queued ones while there is room."""
        with self._lock:
            jobs = [j for j in self.store.jobs() if j.get("status") not in TERMINAL]
            for job in jobs:
                if job["status"] == "running" and self._follow(job):
                    self.store.save_job(job)
            running = sum(j["status"] == "running" for j in jobs)
            for job in sorted((j for j in jobs if j["status"] == "queued"), key=lambda j: (j["created_at"], j["id"])):
                if running >= self.max_running:
                    break
                if job["_attempt"] and self.ray.status(self._submission(job)) in ACTIVE:
                    continue  # a paused attempt still stopping: the next one waits for it
                job["_attempt"] += 1
                self.ray.submit(self._submission(job), job["_config"],
                                {"raytune_it_job": job["id"], "organization": job["organization_id"]})
                job["status"] = "running"
                self._event(job, f"Submitted as Ray Job {self._submission(job)}", attempt=job["_attempt"])
                self.store.save_job(job)
                running += 1

    def _follow(self, job: dict[str, Any]) -> bool:
        """Read a running job's Ray status; whether its document changed."""
        submission = self._submission(job)
        status = self.ray.status(submission)
        if status in ACTIVE:
            changed = False
            if status == "RUNNING" and not job.get("_started_at"):
                job["_started_at"] = now()
                self._event(job, "Fine-tuning job started")
                changed = True
            last = run_events.steps(self.store.run_folder(job["id"]))[-1:]
            if last:
                from raytune_it.train.step_metrics import eta_seconds

                estimate = int(now() + eta_seconds(last[0]))
                changed = changed or estimate != job.get("estimated_finish")
                job["estimated_finish"] = estimate
            return changed
        if status == SUCCEEDED:
            self._succeed(job)
        elif status == FAILED:
            reason = self.ray.failure(submission)
            job["error"] = {"code": "training_failed", "message": reason, "param": None}
            self._finish(job, "failed", f"Fine-tuning job failed: {reason}", "error")
        elif status in (STOPPED, VANISHED):
            reason = (f"its Ray Job {submission} was stopped outside this service" if status == STOPPED else
                      f"its Ray Job {submission} is gone (the Ray cluster was replaced, or the job deleted)")
            job["error"] = {"code": "job_lost", "message": reason, "param": None}
            self._finish(job, "failed", f"Fine-tuning job failed: {reason}", "error")
        return True

    def _succeed(self, job: dict[str, Any]) -> None:
        import json

        run = self.store.run_folder(job["id"])
        if not is_published(run / "export") and not (run / "export" / "adapter_config.json").exists():
            job["error"] = {"code": "no_export", "message": "the run ended without an export", "param": None}
            self._finish(job, "failed", "Fine-tuning job failed: the run ended without an export", "error")
            return
        try:
            summary = json.loads((run / "summary.json").read_text())
            job["trained_tokens"] = int(summary.get("train_tokens") or 0)
        except (OSError, ValueError):
            pass
        results = save_result_file(self.store, job["organization_id"], f"{job['id']}-metrics.csv",
                                   run_events.metrics_csv(run))
        job["result_files"] = [results["id"]]
        job["fine_tuned_model"] = str(self.fine_tuned(job))
        self._event(job, f"New fine-tuned model created: {job['fine_tuned_model']}")
        self._finish(job, "succeeded", "The job has successfully completed")
