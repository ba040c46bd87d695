"""The training strategy protocol: what the loop needs from ZeRO-3 and from LoRA.

The loop (``raytune_it/train/loop.py``) is written once against this protocol;
each method is one small implementation of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from raytune_it.config.schema import JobConfig
from raytune_it.data.tokenize import IGNORE_INDEX


class Strategy(Protocol):
    def step(self, micro_batches: Sequence[dict]) -> float:
        """One optimizer step over the micro-batches (gradient accumulation); returns the mean loss."""

    def eval_batch(self, batch: dict) -> tuple[float, int]:
        """Summed token loss and the number of trained tokens in one eval batch."""

    def learning_rate(self) -> float: ...

    def describe(self) -> dict[str, Any]:
        """Facts about the set-up as built (precision, sharding, parameter counts), for the summary."""

    def save_checkpoint(self, folder: Path) -> None:
        """Write this rank's part of a checkpoint into ``folder`` (a replica rank may write nothing)."""

    def load_checkpoint(self, folder: Path) -> None: ...

    def export(self, folder: Path, tokenizer: Any) -> None:
        """Write the tuned result in its ecosystem format (HF model dir or peft adapter)."""


def trained_tokens(labels: Any) -> int:
    """Tokens the loss covers: labels shifted by one, ignoring the masked ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def make_strategy(config: JobConfig, total_steps: int, device: Any) -> Strategy:
    if config.method == "full":
        from raytune_it.train.strategies.zero3 import ZeRO3Strategy

        return ZeRO3Strategy(config, total_steps, device)
    from raytune_it.train.strategies.lora import LoraStrategy

    return LoraStrategy(config, total_steps, device)
