"""Full tuning with DeepSpeed ZeRO (stage 3 by default), BF16 and gradient checkpointing.

The DeepSpeed config is generated from the job config, never written by hand.
``HfDeepSpeedConfig`` makes transformers build the model under
``deepspeed.zero.Init``, so parameters are partitioned as they are created and
no worker holds the whole model. On the CPU the same code runs over gloo with
DeepSpeed's CPU accelerator; on GPUs over NCCL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from raytune_it.config.schema import JobConfig
from raytune_it.train.strategies.base import (
    StrategyBase,
    checkpointing_on,
    enable_checkpointing,
    install_loss,
    optimizer_name,
    token_loss_sum,
    world_size,
)

CHECKPOINT_TAG = "zero"


def deepspeed_config(config: JobConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    ds, train = config.deepspeed, config.train
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": train.weight_decay,
                       # torch's fused AdamW on CPU and GPU alike: as fast as DeepSpeed's FusedAdam, and no
                       # CUDA extension to JIT-compile (nvcc) on every fresh worker. Offloaded optimizer
                       # states keep DeepSpeed's CPUAdam, which is built for that.
                       **({} if ds.offload_optimizer else {"torch_adam": True, "fused": True})},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def skip_inference_shm_op() -> None:
    """Keep DeepSpeed's CPU accelerator from compiling its shared-memory all-reduce op.

    DeepSpeed's comm layer JIT-compiles that C++ op when it starts on a CPU (27 s on a fresh 2-core
    machine, in the first ZeRO-3 job of every fresh install), but only inference tensor parallelism
    calls it (``inference_all_reduce``); training's collectives go through gloo. Marking the op
    incompatible is DeepSpeed's own switch for a machine that cannot build it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


class ZeRO3Strategy(StrategyBase):
    def __init__(self, config: JobConfig, total_steps: int, device: Any) -> None:
        import torch

        use_gpu = device.type == "cuda"
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM, get_scheduler
        from transformers.integrations import HfDeepSpeedConfig

        from raytune_it.models.loading import resolve_model_path

        if not use_gpu:
            skip_inference_shm_op()
        # Ray Train already set up torch.distributed; DeepSpeed's comm layer adopts that process group.
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
        world_size = torch.distributed.get_world_size()
        self.config = config
        self.ds_config = deepspeed_config(config, world_size, use_gpu)
        # Kept alive on purpose: while it exists, from_pretrained builds under zero.Init.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(config.model.name_or_path),
            dtype=torch.bfloat16 if config.deepspeed.bf16 else torch.float32,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            use_safetensors=True,
        )
        model.config.use_cache = False
        if config.deepspeed.gradient_checkpointing:
            enable_checkpointing(model)
        self.loss = install_loss(model, config, device, partitioned=config.deepspeed.zero_stage == 3)
        warmup = int(config.train.warmup_ratio * total_steps)

        def scheduler(optimizer: Any) -> Any:
            return get_scheduler(config.train.lr_schedule, optimizer, warmup, total_steps)

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=scheduler,
        )
        self.forward_model = self.engine
        self.device = self.engine.device

    def backward(self, micro_batches: Sequence[dict], trained_tokens: Any) -> Any:
        import torch

        self.engine.train()
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            loss, loss_sum = token_loss_sum(self.engine, self._to_device(batch), trained_tokens, world_size())
            # The loss is already this micro-batch's share of the step: DeepSpeed must not divide it by the
            # accumulation steps again.
            self.engine.backward(loss, scale_wrt_gas=False)
            if index < len(micro_batches) - 1:
                self.engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-batch
            total += loss_sum.float()
        return total  # still on the device: the loop reads it a step later

    def optimizer_step(self) -> None:
        self.engine.step()  # the accumulation boundary: DeepSpeed clips and steps the optimizer and schedule

    def describe(self) -> dict[str, Any]:
        params = list(self.engine.module.parameters())
        partitioned = all(hasattr(p, "ds_tensor") for p in params)
        return {
            "zero_stage": self.engine.zero_optimization_stage(),
            "optimizer": optimizer_name(self.engine.optimizer),
            "bf16": self.engine.bfloat16_enabled(),
            "gradient_checkpointing": checkpointing_on(self.engine.module),
            "loss": self.loss,
            "total_parameters": sum(p.ds_numel if partitioned else p.numel() for p in params),
            # What this rank actually holds: about total / world_size under ZeRO-3.
            "parameters_on_rank": sum(p.ds_tensor.numel() if partitioned else p.numel() for p in params),
        }

    def save_checkpoint(self, folder: Path) -> None:
        # Every rank writes its own partition of parameters and optimizer states.
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        (folder / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))

    def load_checkpoint(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r} in {folder}")

    def export(self, folder: Path, tokenizer: Any) -> None:
        """Gather the ZeRO-3 shards into one 16-bit state dict on rank 0 and save a HF model dir."""
        state_dict = self.engine._zero3_consolidated_16bit_state_dict() if self.config.deepspeed.zero_stage == 3 \
            else self.engine.module.state_dict()
        if self.engine.global_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            module = self.engine.module
            module.config.use_cache = True
            module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)
