"""raytune-it: instruction tuning of LLaMA-family models on Ray, and serving them.

The public face is small and imports nothing heavy::

    import raytune_it
    config = raytune_it.load_config("tiny-lora", ["lora.rank=8"])
    print(config.lora.rank)  # 8

Everything else lives in the subpackages and is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["JobConfig", "load_config", "__version__"]

if TYPE_CHECKING:
    from raytune_it.config import JobConfig, load_config


def __getattr__(name: str) -> Any:
    if name in {"JobConfig", "load_config"}:
        from raytune_it import config

        return getattr(config, name)
    raise AttributeError(f"module 'raytune_it' has no attribute {name!r}")
