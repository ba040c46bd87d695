"""Weights & Biases, through ``wandb.init`` with a run object per tracked run (``reinit="create_new"``).

Steps are logged against a ``step`` metric of their own (``define_metric``), not W&B's internal step:
a run resumed from its checkpoint logs its last steps again, and W&B drops steps below its internal
one. W&B's console capture and banner are off; the driver prints one line with the run's address.
``WANDB_MODE=offline`` keeps runs on disk for ``wandb sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXIT_CODES = {"finished": 0, "failed": 1, "killed": 130}


class WandbBackend:
    label = "W&B"

    def __init__(self, *, uri: str | None, experiment: str, run_name: str, run_id: str | None,
                 params: dict[str, Any], tags: dict[str, str], group: str | None, job_type: str,
                 folder: str | None) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", **({"base_url": uri} if uri else {}))
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=experiment, name=run_name, id=run_id, resume="allow" if run_id else None,
                              group=group, job_type=job_type, config=params, dir=folder, settings=settings,
                              reinit="create_new", allow_val_change=True, tags=[job_type])
        # W&B tags are bare labels; the run's own facts (its folder, its export) sit beside its config.
        self.run.config.update(tags, allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = self.run.id

    @property
    def address(self) -> str:
        if self.run.settings.mode == "offline":
            folder = Path(self.run.dir).parent
            return f"offline run {folder} (upload it with: wandb sync {folder})"
        return self.run.url or f"run {self.run_id}"

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in steps:
            self.run.log({"step": step, **values})

    def log_outcome(self, metrics: dict[str, float], tags: dict[str, str], files: dict[str, str],
                    step: int) -> None:
        self.run.summary.update(metrics)
        self.run.config.update(tags, allow_val_change=True)
        for name, text in files.items():
            path = Path(self.run.dir) / name
            path.write_text(text)
            self.run.save(str(path), base_path=self.run.dir, policy="now")

    def end(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES[status])
