"""Training strategies behind one protocol (``base.Strategy``): ZeRO-3 full tuning and LoRA.

The factory lives here, above both, so the protocol's module imports neither implementation."""

from __future__ import annotations

from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.train.strategies.base import Strategy


def make_strategy(config: JobConfig, total_steps: int, device: Any) -> Strategy:
    """The strategy ``config.method`` names, built on this worker's ``device``."""
    if config.method == "full":
        from raytune_it.train.strategies.zero3 import ZeRO3Strategy

        return ZeRO3Strategy(config, total_steps, device)
    from raytune_it.train.strategies.lora import LoraStrategy

    return LoraStrategy(config, total_steps, device)
