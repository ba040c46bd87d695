"""Per-device memory of a tuning job, from first principles.

Bytes per parameter under mixed precision (Rajbhandari et al., ZeRO, 2020):
BF16 weights (2) + BF16 gradients (2) + FP32 master weights and Adam's two
moments (12). ZeRO-3 divides all three over the data-parallel GPUs. LoRA keeps
the base frozen (INT8: 1 byte per linear weight; embeddings and the LM head stay
16-bit) and trains only the adapters, in FP32 with Adam (16 bytes each).

Activations per sequence of s tokens and hidden size h, in 16-bit, follow
Korthikanti et al. (2022): about 34·s·h bytes per layer with a fused attention
kernel (no s² score matrix is stored). Gradient checkpointing keeps only each
layer's input (2·s·h) plus one layer's activations during recompute. A fixed framework
overhead covers the CUDA context, allocator fragmentation and communication buffers.

The logits are counted apart (``logits_bytes``): the model's own loss holds, at its backward,
the 16-bit logits of every token of the micro-batch, their float32 upcast and that upcast's
float32 gradient, 10·V bytes per token; the chunked loss (``raytune_it/train/loss.py``) the
same for one chunk of ``train.loss_chunk_tokens`` tokens.

ZeRO-3 adds working buffers on top of its 1/N shards, at DeepSpeed's defaults
(which the generated DeepSpeed config keeps): the parameters gathered for the
layers in flight (up to ``stage3_max_live_parameters`` = 1e9, 16-bit) and the
gradient reduce bucket (``reduce_bucket_size`` = 5e8, 16-bit). The optimizer
step later upcasts one ``sub_group_size`` (1e9) of gradients to FP32, but by
then the activations are freed, so the step's peak is lower than the backward's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from raytune_it.config.schema import JobConfig
from raytune_it.models.shape import ModelShape, shape_from_hf_config

GIB = 2**30
#: CUDA context, cuBLAS workspaces, NCCL buffers, allocator fragmentation.
FRAMEWORK_OVERHEAD_BYTES = int(2.5 * GIB)
#: DeepSpeed ZeRO-3 defaults the working buffers follow.
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
ZERO3_REDUCE_BUCKET_SIZE = 500_000_000


#: LLaMA-1 shapes (Touvron et al., 2023), the models of the survey's Table 8.
LLAMA_SHAPES = {
    "7B": ModelShape("LLaMA-7B", 32, 4096, 11008, 32, 32, 32000),
    "13B": ModelShape("LLaMA-13B", 40, 5120, 13824, 40, 40, 32000),
    "30B": ModelShape("LLaMA-30B", 60, 6656, 17920, 52, 52, 32000),
    "65B": ModelShape("LLaMA-65B", 80, 8192, 22016, 64, 64, 32000),
}


#: Today's models the planner knows by name (their config.json values), beside the survey's LLaMA sizes.
NAMED_SHAPES = {
    "LLAMA3-8B": ModelShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256),
}


def shape_of_config(config: JobConfig) -> ModelShape:
    from raytune_it.models.loading import resolve_model_path

    path = resolve_model_path(config.model.name_or_path, weights=False)
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
    #: ZeRO-3's gathered parameters and reduce bucket.
    zero_buffers: int = 0
    #: The output head's logits at the loss, all of them or one chunk's (``logits_bytes``).
    logits: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.overhead + self.zero_buffers
                + self.logits)

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), total=self.total)

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in asdict(self).items()
                          if v or k != "zero_buffers")
        return f"{self.total / GIB:.1f} GiB ({parts} GiB)"


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass, for ``micro_batch`` sequences of ``seq_len`` tokens."""
    per_layer_full = 34 * seq_len * shape.hidden
    if checkpointing:
        per_sequence = shape.layers * 2 * seq_len * shape.hidden + per_layer_full
    else:
        per_sequence = shape.layers * per_layer_full
    return micro_batch * per_sequence


def logits_bytes(tokens: int, vocab: int, chunk_tokens: int | None) -> int:
    """The logits' peak for a micro-batch of ``tokens`` tokens: 16-bit logits, their float32 upcast and its
    float32 gradient (10 bytes per token and vocabulary entry), for every token with the model's own loss
    (``chunk_tokens`` None) or for one chunk with the chunked loss."""
    held = tokens if chunk_tokens is None else min(tokens, chunk_tokens)
    return held * vocab * (2 + 4 + 4)


def lora_trainable_params(shape: ModelShape, rank: int, target_modules: list[str]) -> int:
    shapes = shape.module_shapes()
    if list(target_modules) == ["all-linear"]:
        target_modules = list(shapes)
    per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in target_modules if m in shapes)
    return shape.layers * per_layer


#: Bytes per frozen linear weight of a LoRA base: INT8 one; NF4 with double quantization 4.127 bits (the
#: QLoRA paper: 4 bits plus 0.127 of quantization constants per weight); 16-bit two.
BYTES_PER_LINEAR_WEIGHT = {"int8": 1.0, "nf4": 4.127 / 8, "none": 2.0}


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
    lora_quantization: str = "int8",
    lora_targets: list[str] | None = None,
    loss_chunk_tokens: int | None = 256,
) -> MemoryEstimate:
    """Bytes one device needs for one training step; ``loss_chunk_tokens`` None is the full logits' loss."""
    params = shape.parameters
    activations = activation_bytes(shape, seq_len, micro_batch, checkpointing)
    logits = logits_bytes(micro_batch * seq_len, shape.vocab, loss_chunk_tokens)
    if method == "full":
        shard = num_gpus if zero_stage == 3 else 1
        grad_shard = num_gpus if zero_stage >= 2 else 1
        opt_shard = num_gpus if zero_stage >= 1 else 1
        buffers = 0
        if zero_stage == 3 and num_gpus > 1:
            # Two layers in flight (the one computing and the one prefetched), capped by max_live_parameters.
            live = min(ZERO3_MAX_LIVE_PARAMETERS, 2 * shape.linear_params_per_layer, params)
            buffers = 2 * live + 2 * min(ZERO3_REDUCE_BUCKET_SIZE, params)
        return MemoryEstimate(
            weights=2 * params // shard,
            gradients=2 * params // grad_shard,
            optimizer=0 if offload_optimizer else 12 * params // opt_shard,
            activations=activations,
            overhead=FRAMEWORK_OVERHEAD_BYTES,
            zero_buffers=buffers,
            logits=logits,
        )
    linear = shape.layers * shape.linear_params_per_layer
    other = params - linear
    base = linear * BYTES_PER_LINEAR_WEIGHT[lora_quantization] + other * 2
    trainable = lora_trainable_params(shape, lora_rank, lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj"])
    return MemoryEstimate(weights=int(base + 4 * trainable), gradients=4 * trainable, optimizer=8 * trainable,
                          activations=activations, overhead=FRAMEWORK_OVERHEAD_BYTES, logits=logits)


def shape_from_parameter_count(parameters: float, name: str | None = None) -> ModelShape:
    """A LLaMA-proportioned shape for a bare parameter count (the known LLaMA sizes use their real shapes).

    LLaMA keeps about one layer per 128 hidden units and an 8/3 MLP ratio, so
    12·L·h² ≈ P with L = h/128 gives the hidden size; the count is approximate.
    """
    hidden = max(128, round((parameters * 128 / 12) ** (1 / 3) / 128) * 128)
    layers = max(1, round(parameters / (12 * hidden * hidden)))
    intermediate = 256 * math.ceil(8 * hidden / 3 / 256)
    return ModelShape(name or f"{parameters / 1e9:g}B (LLaMA-like)", layers, hidden, intermediate,
                      hidden // 128, hidden // 128, 32000)


def parse_parameter_count(text: str) -> float | None:
    """'7B', '13b', '350M', '6.7e9' -> parameters; None when the text is not a count."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    cleaned = text.strip().lower()
    try:
        if cleaned and cleaned[-1] in units:
            return float(cleaned[:-1]) * units[cleaned[-1]]
        return float(cleaned)
    except ValueError:
        return None
