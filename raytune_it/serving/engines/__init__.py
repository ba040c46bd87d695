"""Inference engines behind one protocol (``base.Engine``); the serving layer knows neither implementation,
and each engine imports only ``base``, so either runs where the other's library is missing."""

from __future__ import annotations

from typing import Sequence

from raytune_it.config.schema import ServeSection
from raytune_it.serving.engines.base import Engine, EngineError, GenerationRequest, GenerationResult


def engine_choice(name: str, use_gpu: bool) -> str:
    """'auto' picks vLLM only where it is importable and a GPU exists."""
    if name != "auto":
        return name
    import importlib.util

    if use_gpu and importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def create_engine(serve_config: ServeSection, base_path: str, base_name: str, max_lora_rank: int | None,
                  lora_target_modules: Sequence[str] | None = None) -> Engine:
    """The configured engine for the base model at ``base_path`` (a local folder), served as ``base_name``.

    ``max_lora_rank``: the largest adapter rank it must run, None for no adapters at all;
    ``lora_target_modules``: the modules every adapter it will run touches, where all are known at start
    (eval, generate), None for any."""
    choice = engine_choice(serve_config.engine, serve_config.use_gpu)
    if choice == "vllm":
        from raytune_it.serving.engines.vllm_engine import VLLMEngine  # imported only where vLLM exists

        return VLLMEngine(serve_config, base_path, base_name, max_lora_rank, lora_target_modules)
    from raytune_it.serving.engines.transformers_engine import TransformersEngine

    return TransformersEngine(serve_config, base_path, base_name)


__all__ = ["Engine", "EngineError", "GenerationRequest", "GenerationResult", "create_engine", "engine_choice"]
