"""Where the service keeps what it is given and what it starts: one folder in ``run.storage``.

::

    <run.storage>/fine_tuning/
      files/<file id>/file.json       the file object (and its organization, format, records)
      files/<file id>/data.<ext>      the bytes uploaded
      jobs/<job id>/job.json          the job's state: the one record of it, rewritten on every change
      jobs/<job id>/config.yaml       the JobConfig the Ray Job trains (secrets left out)
      runs/<job id>/                  the run folder raytune-it train writes (run.name is the job id)

Nothing is kept in a replica: a restarted app, or another replica, reads the same documents. A document is
one object written whole (an object store's PUT, a file's rewrite), so a reader sees the old or the new.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Iterator

from raytune_it.storage import Location, open_location

FOLDER = "fine_tuning"


def new_id(prefix: str) -> str:
    """OpenAI's shape: ``file-…``, ``ftjob-…``, 24 hex digits of randomness."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class ServiceStore:
    def __init__(self, run_storage: str) -> None:
        self.root = open_location(run_storage, "run.storage") / FOLDER

    def file_folder(self, file_id: str) -> Location:
        return self.root / "files" / file_id

    def job_folder(self, job_id: str) -> Location:
        return self.root / "jobs" / job_id

    def runs(self) -> Location:
        return self.root / "runs"

    def run_folder(self, job_id: str) -> Location:
        return self.runs() / job_id

    # --- documents ------------------------------------------------------------------------------

    @staticmethod
    def read(location: Location) -> dict[str, Any] | None:
        try:
            return json.loads(location.read_text()) if location.is_file() else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def write(location: Location, document: dict[str, Any]) -> None:
        location.write_text(json.dumps(document, indent=1))

    def file(self, file_id: str) -> dict[str, Any] | None:
        return self.read(self.file_folder(file_id) / "file.json")

    def save_file(self, document: dict[str, Any]) -> None:
        self.write(self.file_folder(document["id"]) / "file.json", document)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.read(self.job_folder(job_id) / "job.json")

    def save_job(self, document: dict[str, Any]) -> None:
        self.write(self.job_folder(document["id"]) / "job.json", document)

    def _documents(self, kind: str, name: str) -> Iterator[dict[str, Any]]:
        folder = self.root / kind
        try:
            ids = folder.listdir() if folder.exists() else []
        except OSError:
            ids = []
        for entry in ids:
            document = self.read(folder / entry / name)
            if document is not None:
                yield document

    def files(self) -> list[dict[str, Any]]:
        return list(self._documents("files", "file.json"))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._documents("jobs", "job.json"))
