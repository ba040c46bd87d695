"""What a tracked run holds, whichever tracker: its parameters, each step's metrics, its outcome.

One home for these rules, so an MLflow run and a W&B run of the same job carry the same names:
parameters are the flattened config (``lora.rank``, ``train.learning_rate``; never a secret;
MLflow takes them as text, W&B as values), step metrics are the numbers of a ``metrics.jsonl``
line keyed by its ``step``, and a run's outcome is its summary's numbers under ``summary.``.
"""

from __future__ import annotations

import math
from typing import Any

from raytune_it.config.loading import flatten
from raytune_it.config.schema import JobConfig

#: Keys of a metrics.jsonl line that are its position, not a measurement.
POSITION_KEYS = ("step", "total_steps")


def run_params(config: JobConfig) -> dict[str, Any]:
    """The config as tracker parameters, one value per dotted key, without secrets (``to_dict``)."""
    return flatten(config.to_dict())


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_metrics(item: dict) -> dict[str, float]:
    """A step's measurements: its numbers, without its position and without NaN (a step with no eval)."""
    return {key: float(value) for key, value in item.items() if key not in POSITION_KEYS and is_number(value)}


def outcome_metrics(values: dict[str, Any], prefix: str = "summary.") -> dict[str, float]:
    """A summary's (or a sweep's best trial's) numbers, named apart from the step metrics they sum up."""
    return {f"{prefix}{key}": float(value) for key, value in values.items() if is_number(value)}
