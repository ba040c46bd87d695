"""How many GPUs, what batch per device and how many hours: the planner behind ``raytune-it plan``.

Every number is derived, and every assumption is a named input:

* memory per GPU comes from :mod:`raytune_it.plan.memory`;
* ``num_gpus`` is the smallest data-parallel size, among the sizes launchers use
  (1, 2, 4, 8, then whole 8-GPU servers), whose estimate fits one GPU;
* the per-device batch is the smallest of three limits, and the plan says which one binds:
  memory (the largest power of two that fits), GPU saturation (a micro-batch of
  ``saturation_tokens`` tokens already keeps a GPU's matrix units busy, so a
  larger one buys memory pressure, not speed) and the optimization's global batch
  (``global_batch`` sequences per optimizer step, reached with gradient accumulation);
* time is FLOPs over a sustained throughput: 6·P per token for full tuning (forward
  2·P, backward 4·P) and 4·P for LoRA (the frozen base still back-propagates
  activation gradients, 2·P, but computes no weight gradients), plus one more
  forward (2·P) with gradient checkpointing. INT8 base weights run at
  ``INT8_MATMUL_EFFICIENCY`` of the 16-bit rate. ZeRO-3 moves 2·P bytes per
  all-gather or reduce-scatter and micro-batch (three of them, four with
  recompute), times (N-1)/N, over the server's collective bandwidth, or over the
  network once the job spans servers; compute and communication overlap, so a
  micro-batch costs the larger of the two;
* inference at batch 1 reads every weight once per token, so memory bandwidth
  divided by the weights' bytes bounds the generation rate from above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from raytune_it.errors import UserError
from raytune_it.hardware import SERVER_TYPES, ServerType
from raytune_it.plan.memory import GIB, ModelShape, activation_bytes, estimate_memory

Method = Literal["full", "lora"]

#: bitsandbytes LLM.int8() base weights, against a 16-bit base. From first principles: the forward's int8
#: GEMMs run on tensor cores with twice the BF16 peak, the backward dequantizes each weight to 16 bits and
#: multiplies at the 16-bit rate, and quantizing activations per row and dequantizing outputs add memory
#: passes worth about 15-20% of a 4,096-wide layer's matmul time at batches of thousands of tokens.
INT8_MATMUL_EFFICIENCY = 0.8
#: NF4 (QLoRA) dequantizes every 4-bit weight block to 16 bits before each matmul, forward, recompute and
#: backward: Google Cloud's Vertex AI measurements put LoRA about 66% faster than QLoRA, 0.6 of its rate.
NF4_MATMUL_EFFICIENCY = 0.6
QUANTIZED_MATMUL_EFFICIENCY = {"int8": INT8_MATMUL_EFFICIENCY, "nf4": NF4_MATMUL_EFFICIENCY, "none": 1.0}
#: Model FLOP utilisation of a single-GPU LoRA job (no ZeRO-3 gathers, no collectives): published 7B LoRA
#: training rates on A100-class GPUs, 2,400 to 4,000 tokens/s, are 31-52% of BF16 peak at 6·P FLOPs per
#: token (checkpointing); the low end is assumed.
LORA_MFU = 0.31
#: Sequences per optimizer step of a LoRA job: alpaca-lora's recipe (tloen/alpaca-lora, batch_size=128),
#: the usual Alpaca LoRA recipe. One GPU with memory to spare takes as much of it per micro-batch as fits:
#: accumulation only adds steps.
LORA_GLOBAL_BATCH = 128
#: Alpaca-52K, the survey's dataset: 52,002 records; about 200 LLaMA tokens each with the prompt template.
ALPACA_RECORDS = 52_002
ALPACA_MEAN_TOKENS = 200
#: The survey's published full-tuning column (Table 8; A800-80G, ZeRO-3, BF16, checkpointing, 3 epochs, 512).
SURVEY_FULL_A800 = {"7B": (2, 8, 3.0), "13B": (4, 8, 3.1), "30B": (8, 4, 6.1), "65B": (16, 2, 11.2)}
#: The survey's published LoRA column (Table 8; one A800-80G, INT8 base, rank 16, same data): GPUs, batch, hours.
SURVEY_LORA_A800 = {"7B": (1, 80, 3.5), "13B": (1, 48, 5.1), "30B": (1, 24, 14.3), "65B": (1, 4, 60.6)}
SURVEY_A800 = {"full": SURVEY_FULL_A800, "lora": SURVEY_LORA_A800}
#: The share of the memory-bandwidth bound each engine reaches at batch 1. transformers' ``generate``
#: launches every kernel from Python at each token, so a 7B model on an A100-class GPU decodes at about
#: 30 tokens/s, a fifth of its ~150 tokens/s bound; vLLM's CUDA graphs and fused kernels reach about 100
#: tokens/s there, two thirds. ``--calibrate-inference`` replaces them with a run's measured rates.
ENGINE_BANDWIDTH_EFFICIENCY = {"transformers": 0.2, "vllm": 0.65}
MAX_SERVERS = 64


def candidate_gpu_counts(gpus_per_node: int) -> list[int]:
    """1, 2, 4, ... up to one server, then whole servers."""
    small = [n for n in (1, 2, 4, 8, 16) if n < gpus_per_node]
    return small + [gpus_per_node * servers for servers in range(1, MAX_SERVERS + 1)]


@dataclass
class Workload:
    """What is tuned, on what, and how: the planner's inputs."""

    shape: ModelShape
    method: Method
    server_type: str
    seq_len: int = 512
    records: int = ALPACA_RECORDS
    mean_tokens: float = ALPACA_MEAN_TOKENS
    epochs: float = 3.0
    checkpointing: bool = True
    lora_rank: int = 16
    lora_quantization: str = "int8"
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    offload_optimizer: bool = False
    zero_stage: int = 3
    #: Tokens per chunk of the chunked loss; None is the model's own loss over the full logits.
    loss_chunk_tokens: int | None = 256
    #: Sequences per optimizer step, across all GPUs.
    global_batch: int = 32
    #: Tokens per micro-batch that saturate a GPU's matrix units.
    saturation_tokens: int = 4096
    #: Sustained FLOP/s per GPU; None takes the server type's peak times its assumed utilization.
    sustained_flops: float | None = None
    calibrated_from: str | None = None
    #: Share of the batch-1 bandwidth bound per serving engine; None takes ENGINE_BANDWIDTH_EFFICIENCY.
    engine_efficiency: dict[str, float] | None = None
    inference_calibrated_from: str | None = None

    @property
    def server(self) -> ServerType:
        return SERVER_TYPES[self.server_type]

    @property
    def tokens(self) -> float:
        return self.records * min(self.mean_tokens, self.seq_len) * self.epochs


@dataclass
class Plan:
    model: str
    parameters: int
    method: str
    server_type: str
    feasible: bool
    reason: str
    num_gpus: int | None = None
    servers: int | None = None
    per_device_batch_size: int | None = None
    max_batch_that_fits: int | None = None
    #: What memory alone would allow with the full logits' loss, when the plan uses the chunked one.
    max_batch_with_full_logits: int | None = None
    batch_limited_by: str | None = None
    gradient_accumulation_steps: int | None = None
    memory_gib: dict[str, float] = field(default_factory=dict)
    activation_gib_per_sequence: dict[str, float] = field(default_factory=dict)
    train_tokens: float = 0.0
    train_flops: float = 0.0
    sustained_tflops_per_gpu: float = 0.0
    compute_hours: float | None = None
    communication_hours: float | None = None
    est_hours: float | None = None
    inference: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _estimate(workload: Workload, gpus: int, batch: int) -> Any:
    return estimate_memory(
        workload.shape, method=workload.method, num_gpus=gpus, micro_batch=batch, seq_len=workload.seq_len,
        checkpointing=workload.checkpointing, zero_stage=workload.zero_stage,
        offload_optimizer=workload.offload_optimizer, lora_rank=workload.lora_rank,
        lora_quantization=workload.lora_quantization,
        lora_targets=workload.lora_targets, loss_chunk_tokens=workload.loss_chunk_tokens,
    )


def _fits(workload: Workload, gpus: int, batch: int) -> tuple[bool, Any]:
    estimate = _estimate(workload, gpus, batch)
    return estimate.total <= workload.server.gpu_memory_gib * GIB, estimate


def largest_batch(workload: Workload, gpus: int) -> int:
    """The largest power-of-two micro-batch that fits (1 if none larger does), up to 4,096."""
    fits = 1
    while fits < 4096 and _fits(workload, gpus, fits * 2)[0]:
        fits *= 2
    return fits


def flops_per_token(shape: ModelShape, method: str, checkpointing: bool) -> float:
    passes = 6 if method == "full" else 4
    return (passes + (2 if checkpointing else 0)) * shape.parameters


def global_batch(workload: Workload) -> int:
    """Sequences per optimizer step: the workload's, or alpaca-lora's 128 for a LoRA job left at the default."""
    if workload.method == "lora" and workload.global_batch == Workload.global_batch:
        return LORA_GLOBAL_BATCH
    return workload.global_batch


def sustained_flops(workload: Workload) -> float:
    if workload.sustained_flops is not None:
        return workload.sustained_flops
    if workload.method == "lora":
        rate = workload.server.peak_bf16_flops * LORA_MFU
        return rate * QUANTIZED_MATMUL_EFFICIENCY[workload.lora_quantization]
    return workload.server.peak_bf16_flops * workload.server.sustained_mfu


def inference_plan(shape: ModelShape, server: ServerType, seq_len: int,
                   efficiency: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Batch-1 serving: GPUs to hold the weights and the KV cache, the bandwidth bound on tokens/s, and
    the rate each engine is expected to reach (the bound times its ``efficiency``)."""
    efficiency = efficiency or ENGINE_BANDWIDTH_EFFICIENCY
    linear = shape.layers * shape.linear_params_per_layer
    kv_cache = 2 * shape.layers * shape.kv_heads * (shape.hidden // shape.heads) * seq_len * 2
    out: dict[str, dict[str, Any]] = {}
    for precision, weight_bytes in (("bf16", 2 * shape.parameters),
                                    ("int8", linear + 2 * (shape.parameters - linear))):
        gpus = next((n for n in candidate_gpu_counts(server.gpus_per_node)
                     if (weight_bytes + kv_cache) / n + 2.5 * GIB <= server.gpu_memory_gib * GIB), None)
        # Tensor parallel over n GPUs: each reads its 1/n of the weights per token, all at once.
        bound = None if gpus is None else gpus * server.memory_bandwidth / weight_bytes
        out[precision] = {
            "num_gpus": gpus,
            "weights_gib": round(weight_bytes / GIB, 1),
            "max_tokens_per_second": None if bound is None else round(bound, 1),
            # 16-bit only: bitsandbytes' INT8 decoding is launch-bound and slower than 16-bit at batch 1,
            # so its bandwidth bound says nothing about the rate it reaches.
            "expected_tokens_per_second": {engine: None if bound is None else round(bound * share, 1)
                                           for engine, share in efficiency.items()} if precision == "bf16" else {},
        }
    return out


def plan(workload: Workload) -> Plan:
    shape, server = workload.shape, workload.server
    result = Plan(model=shape.name, parameters=shape.parameters, method=workload.method,
                  server_type=workload.server_type, feasible=False, reason="")
    result.assumptions = {
        "records": workload.records, "mean_tokens_per_record": workload.mean_tokens, "epochs": workload.epochs,
        "seq_len": workload.seq_len, "gradient_checkpointing": workload.checkpointing,
        "global_batch_sequences": global_batch(workload), "saturation_tokens": workload.saturation_tokens,
        "gpu_memory_gib": server.gpu_memory_gib, "peak_bf16_tflops": server.peak_bf16_flops / 1e12,
        "sustained_mfu": LORA_MFU if workload.method == "lora" else server.sustained_mfu,
        "collective_gb_per_s": server.collective_bandwidth / 1e9,
        "network_gb_per_s_per_node": server.interconnect_bandwidth / 1e9,
        "lora_quantization": workload.lora_quantization if workload.method == "lora" else None,
        "quantized_matmul_efficiency": QUANTIZED_MATMUL_EFFICIENCY[workload.lora_quantization]
        if workload.method == "lora" else 1.0,
        "calibrated_from": workload.calibrated_from,
        "engine_bandwidth_efficiency": workload.engine_efficiency or ENGINE_BANDWIDTH_EFFICIENCY,
        "inference_calibrated_from": workload.inference_calibrated_from,
        "loss": "full logits" if workload.loss_chunk_tokens is None else
        f"chunked, {workload.loss_chunk_tokens} tokens per chunk",
    }
    result.inference = inference_plan(shape, server, workload.seq_len, workload.engine_efficiency)
    result.activation_gib_per_sequence = {
        "with_checkpointing": round(activation_bytes(shape, workload.seq_len, 1, True) / GIB, 3),
        "without_checkpointing": round(activation_bytes(shape, workload.seq_len, 1, False) / GIB, 3),
    }
    result.train_tokens = workload.tokens
    result.train_flops = flops_per_token(shape, workload.method, workload.checkpointing) * workload.tokens
    result.sustained_tflops_per_gpu = round(sustained_flops(workload) / 1e12, 3)

    # LoRA runs as DDP: every GPU holds the whole (INT8) base, so more GPUs never make it fit.
    counts = candidate_gpu_counts(server.gpus_per_node) if workload.method == "full" else [1]
    gpus = next((n for n in counts if _fits(workload, n, 1)[0]), None)
    if gpus is None:
        _, estimate = _fits(workload, counts[-1], 1)
        result.memory_gib = {k: round(v / GIB, 2) for k, v in estimate.to_dict().items()}
        result.reason = (f"does not fit: even one sequence needs {estimate.total / GIB:.1f} GiB per GPU on "
                         f"{counts[-1]} GPU(s), more than a {workload.server_type} GPU's {server.gpu_memory_gib:g} GiB"
                         + ("; LoRA is data parallel, so every GPU holds the whole base model"
                            if workload.method == "lora" else ""))
        return result

    fits = largest_batch(workload, gpus)
    limits = {"memory": fits, "global batch": max(1, global_batch(workload) // gpus)}
    if gpus > 1:
        # Across GPUs a bigger micro-batch buys memory pressure, not speed. One GPU with memory to spare takes
        # the global batch in as few micro-batches as fit: accumulation would only add optimizer steps.
        limits["GPU saturation"] = max(1, workload.saturation_tokens // workload.seq_len)
    binding = min(limits, key=lambda name: (limits[name], name != "memory"))
    batch = limits[binding]
    _, estimate = _fits(workload, gpus, batch)
    result.feasible = True
    result.num_gpus, result.servers = gpus, math.ceil(gpus / server.gpus_per_node)
    result.per_device_batch_size, result.max_batch_that_fits, result.batch_limited_by = batch, fits, binding
    result.gradient_accumulation_steps = max(1, math.ceil(global_batch(workload) / (gpus * batch)))
    if workload.loss_chunk_tokens is not None:
        result.max_batch_with_full_logits = largest_batch(replace(workload, loss_chunk_tokens=None), gpus)
    result.memory_gib = {k: round(v / GIB, 2) for k, v in estimate.to_dict().items()}

    compute_s = result.train_flops / (gpus * sustained_flops(workload))
    communication_s = 0.0
    if workload.method == "full" and gpus > 1:
        micro_batches = workload.tokens / (gpus * batch * min(workload.mean_tokens, workload.seq_len))
        collectives = 4 if workload.checkpointing else 3
        volume = collectives * 2 * shape.parameters * (gpus - 1) / gpus
        bandwidth = server.collective_bandwidth
        if gpus > server.gpus_per_node:
            bandwidth = min(bandwidth, server.interconnect_bandwidth)
        communication_s = micro_batches * volume / bandwidth
    # Four decimals: a small job's estimate is seconds, not a rounded-away zero.
    result.compute_hours = round(compute_s / 3600, 4)
    result.communication_hours = round(communication_s / 3600, 4)
    result.est_hours = round(max(compute_s, communication_s) / 3600, 4)
    result.reason = (f"fits {gpus} GPU(s) at {estimate.total / GIB:.1f} GiB each; batch {batch} per device, "
                     f"limited by {binding}; "
                     + ("communication-bound" if communication_s > compute_s else "compute-bound"))
    return result


CALIBRATE_HINT = "point {flag} at a finished run folder whose files are whole"


def measured_throughput(run_dir: str) -> tuple[float, str]:
    """The model FLOP/s per device a finished run sustained (its summary.json), and where it came from.

    ``run_dir`` is a local run folder or its storage URI."""
    from raytune_it.config.loading import load_run_config
    from raytune_it.plan.memory import shape_of_config
    from raytune_it.run_files import read_json_object
    from raytune_it.storage import as_location

    folder = as_location(run_dir, "--calibrate")
    if not (folder / "summary.json").is_file():
        raise UserError(f"--calibrate {run_dir}: no summary.json there; point it at a finished run folder "
                                "(run.storage/run.name)")
    summary = read_json_object(folder / "summary.json", CALIBRATE_HINT.format(flag="--calibrate"))
    config = load_run_config(folder / "config.yaml")
    shape = shape_of_config(config)
    measured = (flops_per_token(shape, config.method, config.gradient_checkpointing)
                * summary.positive_number("tokens_per_second") / summary.positive_number("num_workers"))
    return measured, (f"{run_dir} ({config.method} on {summary['num_workers']} {summary.get('device', '?')} "
                      f"worker(s), server type {summary.get('server_type')}: {measured / 1e12:.4g} TFLOP/s per device)")


def measured_engine_efficiency(run_dir: str) -> tuple[dict[str, float], str]:
    """Each engine's share of the bandwidth bound in a ``raytune-it run`` folder's batch-1 measurements
    (``serve.json``, from ``POST /v1/latency``): the rate of its base model over that model's bound on the
    server type the run served on (its ``scaling.server_type``)."""
    from raytune_it.config.loading import load_run_config
    from raytune_it.plan.memory import shape_of_config
    from raytune_it.run_files import RunFileObject, read_json_object
    from raytune_it.storage import as_location

    folder = as_location(run_dir, "--calibrate-inference")
    if not (folder / "serve.json").is_file():
        raise UserError(f"--calibrate-inference {run_dir}: no serve.json there; point it at a finished "
                        "'raytune-it run' folder (run.storage/run.name)")
    config = load_run_config(folder / "config.yaml")
    if config.scaling.server_type not in SERVER_TYPES:
        raise UserError(f"--calibrate-inference {run_dir}: the run served on scaling.server_type="
                        f"{config.scaling.server_type}, whose memory bandwidth is unknown; calibrate from a run on "
                        f"one of: {', '.join(SERVER_TYPES)}")
    server = SERVER_TYPES[config.scaling.server_type]
    shape = shape_of_config(config)
    bound = server.memory_bandwidth / (2 * shape.parameters)  # the base model, 16-bit, one GPU
    served = read_json_object(folder / "serve.json", CALIBRATE_HINT.format(flag="--calibrate-inference"))
    shares: dict[str, list[float]] = {}
    for item in served.values():
        if not isinstance(item, RunFileObject):
            raise UserError(f"{served.source}: holds {item!r} where a model's measurement belongs; {served.hint}")
        if item.get("adapter") is None and isinstance(item.get("engine"), str) and item.get("tokens_per_second"):
            shares.setdefault(item["engine"], []).append(item.positive_number("tokens_per_second") / bound)
    if not shares:
        raise UserError(f"--calibrate-inference {run_dir}: serve.json has no base-model measurement")
    measured = {engine: float(f"{sum(values) / len(values):.4g}") for engine, values in shares.items()}
    return measured, f"{run_dir} ({', '.join(f'{e}: {v:.0%} of the bound' for e, v in measured.items())})"


def calibrate(workload: Workload, run_dir: str) -> Workload:
    """Replace the assumed throughput with the one a finished run measured."""
    measured, source = measured_throughput(run_dir)
    return replace(workload, sustained_flops=measured, calibrated_from=source)


def workload_from_config(config: Any, shape: ModelShape | None = None, server_type: str | None = None,
                         **data: Any) -> Workload:
    """The workload a job config describes; ``data`` may carry records / mean_tokens measured elsewhere."""
    from raytune_it.plan.memory import shape_of_config

    chosen = server_type or (config.scaling.server_type if config.scaling.server_type != "any" else "a800-80g")
    train = config.train
    return Workload(
        shape=shape or shape_of_config(config), method=config.method, server_type=chosen, seq_len=train.max_seq_len,
        epochs=train.epochs, checkpointing=config.gradient_checkpointing, lora_rank=config.lora.rank,
        lora_quantization=config.lora.quantization, lora_targets=list(config.lora.target_modules),
        offload_optimizer=config.deepspeed.offload_optimizer, zero_stage=config.deepspeed.zero_stage,
        global_batch=train.micro_batch_size * train.gradient_accumulation_steps * config.scaling.num_workers,
        loss_chunk_tokens=None if train.loss_implementation == "full" else train.loss_chunk_tokens,
        **data,
    )


def estimate_for_config(config: Any, shape: ModelShape | None = None) -> Any:
    """Memory per GPU of this exact config (its workers, micro-batch, ZeRO stage and checkpointing): the one
    estimate behind train's warning, the sweep's skipped trials and the planner."""
    return _estimate(workload_from_config(config, shape), config.scaling.num_workers, config.train.micro_batch_size)


def config_fit_problem(config: Any, shape: ModelShape | None = None, budget_bytes: float | None = None) -> str | None:
    """Why this exact config (its workers and micro-batch) will not fit a GPU of its server type; None if it fits.

    Train warns with it before launch, and sweeps skip trials with it.
    """
    if budget_bytes is None:
        if config.scaling.server_type == "any":
            return None
        budget_bytes = SERVER_TYPES[config.scaling.server_type].gpu_memory_gib * GIB
        where = f"a {config.scaling.server_type} GPU's {budget_bytes / GIB:.0f} GiB"
    else:
        where = f"the {budget_bytes / GIB:.1f} GiB budget"
    estimate = estimate_for_config(config, shape)
    if estimate.total <= budget_bytes:
        return None
    advice = ("lower train.micro_batch_size, raise scaling.num_workers (ZeRO-3 shards over them) or enable "
              "deepspeed.gradient_checkpointing" if config.method == "full" else
              "lower train.micro_batch_size, or set lora.quantization=nf4 (or int8) or "
              "lora.gradient_checkpointing=true (LoRA is data parallel: more workers do not shrink the base model)")
    return (f"needs about {estimate.describe()} per GPU, more than {where}; {advice}. "
            "Size it with: raytune-it plan CONFIG")
