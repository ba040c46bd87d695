"""Checks that need the model but no Ray worker: run on the driver before launch."""

from __future__ import annotations

from raytune_it.config.schema import ALL_LINEAR, JobConfig
from raytune_it.errors import ConfigError


def model_module_names(config: JobConfig) -> set[str]:
    """Module names of the model, built on the meta device: no weights are read, even for 65B."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytune_it.models.loading import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model.name_or_path, weights=False),
                                              revision=config.model.revision,
                                              trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    return {name for name, _ in model.named_modules() if name}


def check_lora_targets(config: JobConfig) -> None:
    if config.lora.peft_target_modules == ALL_LINEAR:
        return  # peft finds the linear layers itself
    names = model_module_names(config)
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    missing = [target for target in config.lora.target_modules if target not in leaves and target not in names]
    if missing:
        linear = sorted(leaf for leaf in leaves if leaf.endswith(("proj", "fc", "head")))
        raise ConfigError(f"lora.target_modules: the model has no module named {', '.join(map(repr, missing))}. "
                          f"Linear modules it has: {', '.join(linear)}")


def preflight(config: JobConfig) -> None:
    if config.data.format == "prompt":
        raise ConfigError("data.format=prompt: plain prompts have no answers to train on; it is for raytune-it "
                          "generate. Train on alpaca, messages or sharegpt records.")
    if config.method == "lora":
        check_lora_targets(config)
