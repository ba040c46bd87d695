"""LoRA over a frozen base, INT8 (bitsandbytes) by default or NF4 (QLoRA), data parallel with DDP.

Across workers this is plain DDP, not ZeRO-3: 8-bit bitsandbytes weights and
ZeRO-3 parameter partitioning do not mix (ZeRO-3 flattens and re-partitions
parameters, which breaks ``Int8Params`` and their quantization state), and the
trainable LoRA weights are small enough that replicating them costs little. Only
the adapter's gradients cross the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from raytune_it.config.schema import JobConfig
from raytune_it.train.strategies.base import (
    StrategyBase,
    adamw,
    checkpointing_on,
    enable_checkpointing,
    install_loss,
    optimizer_name,
    token_loss_sum,
    world_size,
)

if TYPE_CHECKING:
    from raytune_it.models.loading import Precision


def lora_model(config: JobConfig, device: Any) -> Any:
    """The base model (quantized as ``lora.quantization`` says) with the config's LoRA adapter on the
    config's target modules: the peft model a LoRA run trains, before Ray Train wraps it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from raytune_it.models.loading import load_causal_lm

    # GPUs compute in bf16; most CPUs lack fast bf16 matmuls, so the CPU keeps fp32 activations.
    quantized = config.lora.quantization != "none"
    precision: Precision = "bfloat16" if device.type == "cuda" or not quantized else "float32"
    base = load_causal_lm(
        config.model.name_or_path, precision=precision, quantization=config.lora.quantization,
        revision=config.model.revision, trust_remote_code=config.model.trust_remote_code,
        device_map={"": device} if quantized else None,
    )
    base.config.use_cache = False
    if config.lora.quantization == "nf4" and device.type == "cpu":
        keep_nf4_layout_for_training(base)
    checkpointing = config.lora.gradient_checkpointing
    if quantized:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        enable_checkpointing(base)
        base.enable_input_require_grads()
    peft_config = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha,  # type: ignore[arg-type]  # (peft takes a float)
        lora_dropout=config.lora.dropout, target_modules=config.lora.peft_target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(base, peft_config)


class LoraStrategy(StrategyBase):
    def __init__(self, config: JobConfig, total_steps: int, device: Any) -> None:
        import ray.train.torch
        from transformers import get_scheduler

        self.config = config
        self.device = device
        self.peft_model = lora_model(config, device)
        self.loss = install_loss(self.peft_model.get_base_model(), config, device, partitioned=False)
        self.model: Any = ray.train.torch.prepare_model(self.peft_model, parallel_strategy="ddp")
        self.forward_model = self.model
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, config.train.learning_rate, config.train.weight_decay)
        self.scheduler = get_scheduler(config.train.lr_schedule, self.optimizer,
                                       int(config.train.warmup_ratio * total_steps), total_steps)
        self.params = params

    def backward(self, micro_batches: Sequence[dict], trained_tokens: Any) -> Any:
        import contextlib

        import torch

        self.model.train()
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch of the step only.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, loss_sum = token_loss_sum(self.model, self._to_device(batch), trained_tokens, world_size())
                loss.backward()
            total += loss_sum.float()
        return total  # still on the device: the loop reads it a step later

    def optimizer_step(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def describe(self) -> dict[str, Any]:
        base_dtypes = sorted({str(module.base_layer.weight.dtype).removeprefix("torch.")
                              for module in self.peft_model.modules() if hasattr(module, "base_layer")})
        return {
            "base_weight_dtype": ",".join(base_dtypes),
            "quantization": self.config.lora.quantization,
            "lora_rank": self.config.lora.rank,
            "optimizer": optimizer_name(self.optimizer),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "total_parameters": sum(p.numel() for p in self.peft_model.parameters()),
            "gradient_checkpointing": checkpointing_on(self.peft_model.base_model.model),
            "loss": self.loss,
        }

    def save_checkpoint(self, folder: Path) -> None:
        import torch
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return  # the replicas are identical: rank 0 writes for all
        self.peft_model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")

    def load_checkpoint(self, folder: Path) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(folder / "adapter" / "adapter_model.safetensors", device=str(self.device))
        set_peft_model_state_dict(self.peft_model, weights)
        # weights_only: optimizer state is tensors and numbers; nothing else is unpickled.
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, folder: Path, tokenizer: Any) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        if self.config.lora.merge:
            merge_adapter(self.config, folder, folder / "merged")


def keep_nf4_layout_for_training(model: Any) -> None:
    """Turn off bitsandbytes' CPU inference path for 4-bit layers.

    On a CPU with AVX512-BF16, the first forward of a 4-bit layer in eval mode repacks its weights in
    place into a layout for inference kernels, which needs output sizes divisible by 32 (the tiny model's
    MLP has 688) and is not the layout training's dequantization reads. Training evaluates between steps,
    so its layers keep the plain layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def merge_adapter(config: JobConfig, adapter_dir: Path, target: Path) -> None:
    """Merge into a 16-bit reload of the base: merging into INT8 weights would round the update away."""
    from peft import PeftModel

    from raytune_it.models.loading import load_causal_lm, load_tokenizer

    base = load_causal_lm(config.model.name_or_path, precision="bfloat16", revision=config.model.revision,
                          trust_remote_code=config.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(target, safe_serialization=True)
    load_tokenizer(str(adapter_dir)).save_pretrained(target)
    # The adapter is the folder above: this merge is published with it.
    (target / "raytune_it_merge.json").write_text(json.dumps({"adapter": ".."}))
