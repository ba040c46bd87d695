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
    #: Seconds spent in training steps, summed over restarts; evaluation and checkpoints are booked apart.
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    restarts: int = 0

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads((folder / STATE_FILE).read_text()).items() if k in fields})


@dataclass(frozen=True)
class StepPlan:
    """Step counts fixed by the driver, identical on every worker."""

    steps_per_epoch: int
    total_steps: int


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.safetensors"


def save_rng_state(folder: Path, rank: int) -> None:
    """Each rank's torch RNG state (CPU and its GPU): dropout draws from it, so a resumed run
    that restores it replays exactly the steps an uninterrupted run would have taken."""
    import torch
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    target = rng_file(folder, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(states, str(target))


def load_rng_state(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for it (older run, other world size)."""
    import torch
    from safetensors.torch import load_file

    source = rng_file(folder, rank)
    if not source.is_file():
        return False
    states = load_file(str(source))
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    return True
