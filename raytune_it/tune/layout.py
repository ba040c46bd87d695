"""Where a sweep keeps its trials: each is an ordinary run, ``<sweep>/trials/trial-NNN/``."""

from __future__ import annotations

from typing import Any

TRIALS = "trials"


def trial_name(index: int) -> str:
    """A trial's run name: its index, zero-padded so trial folders sort in order."""
    return f"trial-{int(index):03d}"


def trials_dir(sweep_dir: Any) -> Any:
    """The folder holding every trial's run folder (a storage Location)."""
    return sweep_dir / TRIALS


def trial_dir(sweep_dir: Any, index: int) -> Any:
    return trials_dir(sweep_dir) / trial_name(index)
