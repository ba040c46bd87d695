"""Where a run is: saved in every checkpoint so a restart continues, never starts over."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    #: Micro-batches this worker consumed in the current epoch: the data position.
    batches_in_epoch: int = 0
    tokens: int = 0
    #: Seconds spent in the training loop, summed over restarts.
    train_seconds: float = 0.0
    restarts: int = 0

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        return cls(**json.loads((folder / STATE_FILE).read_text()))


@dataclass(frozen=True)
class StepPlan:
    """Step counts fixed by the driver, identical on every worker."""

    steps_per_epoch: int
    total_steps: int
