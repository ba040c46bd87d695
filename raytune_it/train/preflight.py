"""Checks that need the model but no Ray worker: run on the driver before launch."""

from __future__ import annotations

import functools
from typing import Any

from raytune_it.config.schema import ALL_LINEAR, JobConfig
from raytune_it.errors import ConfigError
from raytune_it.models import shape


def meta_model(config: JobConfig) -> Any:
    model = config.model
    return _meta_model(model.name_or_path, model.revision, model.trust_remote_code)


@functools.lru_cache(maxsize=2)
def _meta_model(name_or_path: str, revision: str | None, trust_remote_code: bool) -> Any:
    """Built once per model: a sweep checks every trial against it, and the checks only read it."""
    return shape.meta_model(name_or_path, revision, trust_remote_code)


def model_module_names(config: JobConfig, model: Any = None) -> set[str]:
    model = model if model is not None else meta_model(config)
    return {name for name, _ in model.named_modules() if name}


def check_lora_targets(config: JobConfig, model: Any = None) -> None:
    if config.lora.peft_target_modules == ALL_LINEAR:
        return  # peft finds the linear layers itself
    names = model_module_names(config, model)
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    missing = [target for target in config.lora.target_modules if target not in leaves and target not in names]
    if missing:
        linear = sorted(leaf for leaf in leaves if leaf.endswith(("proj", "fc", "head")))
        raise ConfigError(f"lora.target_modules: the model has no module named {', '.join(map(repr, missing))}. "
                          f"Linear modules it has: {', '.join(linear)}")


def check_lora_rank(config: JobConfig, model: Any) -> None:
    """A rank above the smallest dimension of a module LoRA adapts is refused before Ray starts: that module's
    update cannot have a higher rank, so the rest is parameters and memory for nothing, and a rank in the
    millions (a typo, an API client's value) would otherwise fail as an allocation error in every worker."""
    targets = config.lora.peft_target_modules
    head = model.get_output_embeddings()
    smallest: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        chosen = module is not head if targets == ALL_LINEAR else (name in targets or name.rsplit(".", 1)[-1]
                                                                   in targets)
        if chosen and (smallest is None or min(module.in_features, module.out_features) < smallest[0]):
            smallest = (min(module.in_features, module.out_features), name.rsplit(".", 1)[-1])
    if smallest is not None and config.lora.rank > smallest[0]:
        raise ConfigError(f"lora.rank={config.lora.rank}: above the smallest dimension of a module it adapts "
                          f"({smallest[1]}: {smallest[0]}), so the update cannot use it. Set lora.rank to at most "
                          f"{smallest[0]} (the survey uses 16).")


def check_loss_implementation(config: JobConfig, model: Any) -> None:
    """An explicit ``train.loss_implementation`` the run could not use, refused before Ray starts (the
    workers' ``loss.choose`` would refuse it only once they have loaded the model)."""
    from raytune_it.train.loss import PLAIN_HEAD_ARCHITECTURES

    chosen = config.train.loss_implementation
    if chosen not in ("chunked", "liger"):
        return
    architecture = type(model).__name__
    if architecture not in PLAIN_HEAD_ARCHITECTURES:
        raise ConfigError(
            f"train.loss_implementation={chosen}: it needs logits that are the output head of the final hidden "
            f"states, and {architecture} is not known to compute them so (known: "
            f"{', '.join(sorted(PLAIN_HEAD_ARCHITECTURES))}). Use train.loss_implementation=auto or full.")
    if chosen == "liger" and (config.method != "lora" or not config.scaling.use_gpu):
        raise ConfigError(
            "train.loss_implementation=liger: Liger's fused kernel runs on CUDA (scaling.use_gpu=true) and for "
            f"LoRA only (ZeRO-3 partitions the output head); this run has method={config.method}, "
            f"scaling.use_gpu={str(config.scaling.use_gpu).lower()}. Use train.loss_implementation=auto or "
            "chunked.")


def preflight(config: JobConfig) -> None:
    if config.data.format == "prompt":
        raise ConfigError("data.format=prompt: plain prompts have no answers to train on; it is for raytune-it "
                          "generate. Train on alpaca, messages or sharegpt records.")
    needs_model = config.method == "lora" or config.train.loss_implementation in ("chunked", "liger")
    model = meta_model(config) if needs_model else None
    if config.method == "lora":
        check_lora_targets(config, model)
        check_lora_rank(config, model)
    if model is not None:
        check_loss_implementation(config, model)
