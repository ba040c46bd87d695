"""What one training step reports: each line of ``metrics.jsonl``, each item on the driver's progress queue.

One rule lives here for the one field with a sentinel: a step that did not evaluate (or had no eval
split) reports ``eval_loss`` as NaN, since Ray Train and Tune want a number in every report. Read it
with ``step_eval_loss``, which says None for such a step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, TypedDict

#: ``eval_loss`` of a step that did not evaluate.
NO_EVAL = math.nan


class StepMetrics(TypedDict, total=False):
    step: int
    epoch: int
    total_steps: int
    loss: float
    #: NaN (``NO_EVAL``) unless the step evaluated: read it with ``step_eval_loss``.
    eval_loss: float
    learning_rate: float
    #: Tokens trained so far (padding excluded) and this step's training rate.
    tokens: int
    tokens_per_second: float
    #: Cumulative seconds of training steps, of evaluation and of checkpoints.
    train_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    peak_memory_bytes: int
    restarts: int
    #: Sent with the first step of each attempt.
    worker_nodes: list[str]
    strategy: dict[str, Any]
    train_split: str  # how the workers read the training split (``describe`` of its source)


def step_eval_loss(metrics: Mapping[str, Any]) -> float | None:
    """The eval loss a step reported, or None when it did not evaluate."""
    value = metrics.get("eval_loss")
    return None if value is None or math.isnan(value) else float(value)


def elapsed_seconds(metrics: Mapping[str, Any]) -> float:
    """Seconds of training, evaluation and checkpoints up to this step."""
    return metrics["train_seconds"] + metrics.get("eval_seconds", 0.0) + metrics.get("checkpoint_seconds", 0.0)


def eta_seconds(metrics: Mapping[str, Any]) -> float:
    """Seconds left to the run's last step at this step's pace: the progress line's ETA, and a
    fine-tuning job's estimated finish once it runs."""
    return elapsed_seconds(metrics) / max(1, metrics["step"]) * (metrics["total_steps"] - metrics["step"])
