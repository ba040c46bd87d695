"""Per-device memory of a tuning job, from first principles.

Bytes per parameter under mixed precision (Rajbhandari et al., ZeRO, 2020):
BF16 weights (2) + BF16 gradients (2) + FP32 master weights and Adam's two
moments (12). ZeRO-3 divides all three over the data-parallel GPUs. LoRA keeps
the base frozen (INT8: 1 byte per linear weight; embeddings and the LM head stay
16-bit) and trains only the adapters, in FP32 with Adam (16 bytes each).

Activations per sequence of s tokens and hidden size h, in 16-bit, follow
Korthikanti et al. (2022): about 34·s·h bytes per layer with a fused attention
kernel (no s² score matrix is stored). Gradient checkpointing keeps only each
layer's input (2·s·h) plus one layer's activations during recompute. The logits
and their float32 copy for the loss add s·V·6 bytes. A fixed framework overhead
covers the CUDA context, allocator fragmentation and communication buffers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from raytune_it.config.schema import JobConfig

GIB = 2**30
#: CUDA context, cuBLAS workspaces, NCCL and ZeRO buffers, allocator fragmentation.
FRAMEWORK_OVERHEAD_BYTES = int(2.5 * GIB)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def linear_params_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * self.hidden * 2 + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.layers * (self.linear_params_per_layer + 2 * self.hidden) + self.embedding_params + self.hidden

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LLaMA linear module, by name."""
        kv = self.kv_heads * (self.hidden // self.heads)
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


#: LLaMA-1 shapes (Touvron et al., 2023), the models of the survey's Table 8.
LLAMA_SHAPES = {
    "7B": ModelShape("LLaMA-7B", 32, 4096, 11008, 32, 32, 32000),
    "13B": ModelShape("LLaMA-13B", 40, 5120, 13824, 40, 40, 32000),
    "30B": ModelShape("LLaMA-30B", 60, 6656, 17920, 52, 52, 32000),
    "65B": ModelShape("LLaMA-65B", 80, 8192, 22016, 64, 64, 32000),
}


def shape_from_hf_config(path: str | Path, name: str | None = None) -> ModelShape:
    data = json.loads((Path(path) / "config.json").read_text())
    heads = data["num_attention_heads"]
    return ModelShape(
        name=name or Path(path).name, layers=data["num_hidden_layers"], hidden=data["hidden_size"],
        intermediate=data["intermediate_size"], heads=heads, kv_heads=data.get("num_key_value_heads") or heads,
        vocab=data["vocab_size"], tied_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def shape_of_config(config: JobConfig) -> ModelShape:
    from raytune_it.models.loading import resolve_model_path

    path = resolve_model_path(config.model.name_or_path)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json to read the model's shape from")
    return shape_from_hf_config(path, config.model.name_or_path)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), total=self.total)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in asdict(self).items())
        return f"{self.total / GIB:.1f} GiB ({parts} GiB)"


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    per_layer_full = 34 * seq_len * shape.hidden
    if checkpointing:
        per_sequence = shape.layers * 2 * seq_len * shape.hidden + per_layer_full
    else:
        per_sequence = shape.layers * per_layer_full
    logits = seq_len * shape.vocab * 6
    return micro_batch * (per_sequence + logits)


def lora_trainable_params(shape: ModelShape, rank: int, target_modules: list[str]) -> int:
    shapes = shape.module_shapes()
    per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in target_modules if m in shapes)
    return shape.layers * per_layer


def estimate_memory(
    shape: ModelShape,
    *,
    method: str,
    num_gpus: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = True,
    zero_stage: int = 3,
    offload_optimizer: bool = False,
    lora_rank: int = 16,
    lora_int8: bool = True,
    lora_targets: list[str] | None = None,
) -> MemoryEstimate:
    """Bytes one device needs for one training step."""
    params = shape.parameters
    activations = activation_bytes(shape, seq_len, micro_batch, checkpointing)
    if method == "full":
        shard = num_gpus if zero_stage == 3 else 1
        grad_shard = num_gpus if zero_stage >= 2 else 1
        opt_shard = num_gpus if zero_stage >= 1 else 1
        return MemoryEstimate(
            weights=2 * params // shard,
            gradients=2 * params // grad_shard,
            optimizer=0 if offload_optimizer else 12 * params // opt_shard,
            activations=activations,
            overhead=FRAMEWORK_OVERHEAD_BYTES,
        )
    linear = shape.layers * shape.linear_params_per_layer
    other = params - linear
    base = linear * (1 if lora_int8 else 2) + other * 2
    trainable = lora_trainable_params(shape, lora_rank, lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj"])
    return MemoryEstimate(weights=base + 4 * trainable, gradients=4 * trainable, optimizer=8 * trainable,
                          activations=activations, overhead=FRAMEWORK_OVERHEAD_BYTES)


def estimate_for_config(config: JobConfig, shape: ModelShape | None = None) -> MemoryEstimate:
    return estimate_memory(
        shape or shape_of_config(config), method=config.method, num_gpus=config.scaling.num_workers,
        micro_batch=config.train.micro_batch_size, seq_len=config.train.max_seq_len,
        checkpointing=config.deepspeed.gradient_checkpointing, zero_stage=config.deepspeed.zero_stage,
        offload_optimizer=config.deepspeed.offload_optimizer, lora_rank=config.lora.rank,
        lora_int8=config.lora.int8, lora_targets=list(config.lora.target_modules),
    )
