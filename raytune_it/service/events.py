"""A job's events and checkpoints, in OpenAI's shapes: its lifecycle, kept in the job's document, and what
its run folder says (``metrics.jsonl``: one metrics event per step; Ray Train's checkpoint snapshot: each
recorded checkpoint with its step and losses). Nothing is copied: the run's files are the one record.
"""

from __future__ import annotations

import json
from typing import Any

from raytune_it.storage import Location
from raytune_it.train.checkpoints import SNAPSHOT
from raytune_it.train.step_metrics import elapsed_seconds, step_eval_loss

METRICS_FILE = "metrics.jsonl"
CSV_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens", "tokens_per_second")


def message_event(job_id: str, number: int, created_at: int, message: str, level: str = "info",
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-{number:06d}", "created_at": created_at,
            "level": level, "message": message, "data": data or {}, "type": "message"}


def steps(run: Location) -> list[dict[str, Any]]:
    """Each step once, in order: a step a resumed attempt ran again keeps its latest metrics."""
    from raytune_it.train.driver import read_history

    try:
        return read_history(run / METRICS_FILE)
    except (OSError, ValueError):  # written as we read it: the next read has it whole
        return []


def _step_data(step: dict[str, Any]) -> dict[str, Any]:
    return {"step": step["step"], "total_steps": step["total_steps"], "train_loss": step["loss"],
            "valid_loss": step_eval_loss(step), "learning_rate": step.get("learning_rate"),
            "tokens": step.get("tokens"), "tokens_per_second": step.get("tokens_per_second")}


def metrics_events(job: dict[str, Any], run: Location) -> list[dict[str, Any]]:
    started = job.get("started_at") or job["created_at"]
    events = []
    for step in steps(run):
        data = _step_data(step)
        valid = f", validation loss={data['valid_loss']:.4f}" if data["valid_loss"] is not None else ""
        events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job['id'][6:]}-step-{step['step']}",
                       "created_at": int(started + elapsed_seconds(step)), "level": "info",
                       "message": f"Step {step['step']}/{step['total_steps']}: training loss={step['loss']:.4f}"
                                  f"{valid}, {step.get('tokens_per_second', 0):,.0f} tokens/s",
                       "data": data, "type": "metrics"})
    return events


def checkpoints(job: dict[str, Any], run: Location, model_prefix: str) -> list[dict[str, Any]]:
    """Each checkpoint Ray Train recorded (a ``step_*`` folder whose upload was not recorded is not one)."""
    snapshot = run / "checkpoints" / SNAPSHOT
    try:
        results = json.loads(snapshot.read_text()).get("checkpoint_results", []) if snapshot.is_file() else []
    except (OSError, ValueError):
        return []
    started = job.get("started_at") or job["created_at"]
    out = []
    for result in results:
        metrics = result.get("metrics") or {}
        if "step" not in metrics:
            continue
        step = int(metrics["step"])
        out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job['id'][6:]}-{step}",
                    "created_at": int(started + elapsed_seconds(metrics)) if "train_seconds" in metrics else started,
                    "fine_tuned_model_checkpoint": f"{model_prefix}:ckpt-step-{step}",
                    "fine_tuning_job_id": job["id"], "step_number": step,
                    "metrics": {"step": step, "train_loss": metrics.get("loss"),
                                "valid_loss": step_eval_loss(metrics)}})
    return sorted(out, key=lambda c: c["step_number"], reverse=True)


def checkpoint_events(job: dict[str, Any], listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"object": "fine_tuning.job.event", "id": f"ftevent-{job['id'][6:]}-ckpt-{c['step_number']}",
             "created_at": c["created_at"], "level": "info",
             "message": f"Checkpoint saved at step {c['step_number']}", "data": c["metrics"], "type": "message"}
            for c in listed]


def metrics_csv(run: Location) -> str:
    """The result file: one row per step."""
    rows = [",".join(CSV_COLUMNS)]
    for step in steps(run):
        data = _step_data(step)
        rows.append(",".join("" if data.get(key) is None else str(data[key]) for key in CSV_COLUMNS))
    return "\n".join(rows) + "\n"
