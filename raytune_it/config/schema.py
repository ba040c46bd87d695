"""The job config: one typed, validated object per job.

Every section forbids unknown keys, so a typo (``lora.rnak=8``) is an error
instead of a silently ignored setting. The config is the only thing that crosses
from the CLI into the system, and it is validated on the driver before any Ray
worker starts; workers rebuild it from the dict the driver sends.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from raytune_it.builtins import BUILTIN_FAMILIES
from raytune_it.hardware import ServerTypeChoice

#: Run and adapter names become folder names: keep them to a safe alphabet.
# (section, key) of every secret a config may hold: never saved, never printed.
SECRETS = (("serve", "api_key"),)
#: Where ``raytune-it serve`` (and a Serve replica) finds the API key when ``serve.api_key`` is unset.
API_KEY_ENV = "RAYTUNE_IT_API_KEY"
#: peft's shorthand for LoRA on every linear layer except the output head.
ALL_LINEAR = "all-linear"
#: Characters W&B refuses in a project name (and so in ``tracking.experiment``).
NOT_IN_EXPERIMENT = "/\\#?%:"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


#: One label of a hostname (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_host(value: str) -> bool:
    """An IPv4 or IPv6 address, or a hostname of at most 253 characters."""
    import ipaddress

    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(HOST_LABEL.match(label) for label in name.split("."))


def _checked_uri(value: str) -> str:
    """Storage URIs are checked here without the network; reachability is checked before launch."""
    from raytune_it.storage import uri_problem

    problem = uri_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _real_number(value: Any) -> Any:
    """Numbers, and numbers YAML leaves as text (it reads ``1e-4`` as a string); never a boolean."""
    if isinstance(value, bool):
        raise ValueError("a number is required, not true/false")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("a number is required") from None
    return value


# Strict numbers and booleans: ``lora.rank=true`` or ``train.max_steps=1.0`` is refused, naming the key,
# instead of becoming rank 1 or 1 step.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_real_number), Field(allow_inf_nan=False)]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSection(Section):
    name_or_path: str = Field(
        "tiny-llama",
        description="A local Hugging Face model directory, a storage URI of one (s3://..., fetched into each "
        "node's cache), a hub id (where a hub is reachable), or a built-in tiny model built locally on first use: "
        "'tiny-llama' (LLaMA 1/2-shaped), 'tiny-llama3', 'tiny-qwen2' or 'tiny-mistral'.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    trust_remote_code: Bool = Field(
        False, description="Allow model code from the model directory to run. Off: it executes arbitrary code."
    )

    @field_validator("name_or_path")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        return _checked_uri(value)


class DataSection(Section):
    path: str = Field(
        "builtin:tasks",
        description="Records in data.format: a .json (array), .jsonl or .parquet file, or a folder of such shards "
        "(one type, read in name order as one dataset), as a local path or storage URI; or 'builtin:tasks' for the "
        "project's generated instruction data (Alpaca).",
    )

    format: Literal["alpaca", "messages", "sharegpt", "prompt"] = Field(
        "alpaca", description="Record format: 'alpaca' (instruction / input / output), 'messages' (OpenAI's chat "
        "fine-tuning format: {messages: [{role, content}], tools}, with text parts, developer, tool calls, tool turns "
        "and per-message weight) or 'sharegpt' ({conversations: [{from, value}]}). Conversations train every "
        "assistant turn whose weight is not 0. 'prompt' ({prompt: text}, sent as it is) "
        "is for raytune-it generate only: it has no answers to train on.")
    template: Literal["auto", "alpaca", "chatml", "llama-2", "llama-3"] = Field(
        "auto", description="Prompt format: 'auto' is the tokenizer's chat template, or the Alpaca prompt when it "
        "has none; or a named chat template. Saved in the export's tokenizer, so serve renders chat the same way.")
    file_type: Literal["auto", "json", "jsonl", "parquet"] = Field(
        "auto", description="File type; 'auto' detects it from the file name and first byte."
    )
    eval_fraction: Float = Field(
        0.05, ge=0.0, le=0.5, description="Share of records held out for eval loss (deterministic by content hash); "
        "not used with data.eval_path."
    )
    eval_path: str | None = Field(
        None, description="Eval records in a file of their own (same format and file type as data.path, a local path "
        "or storage URI); then every record of data.path is trained.")
    packing: Bool = Field(
        False, description="Pack several examples into each max_seq_len sequence (no attention across examples)."
    )
    group_by_length: Bool = Field(
        False, description="Cut each window of 16 shuffled micro-batches into micro-batches of similar length, "
        "in random order: less padding and more tokens/s, but batches of one length (often one kind of task) "
        "can cost eval loss in short runs (like transformers' group_by_length; docs/training.md)."
    )
    skip_bad_records: Bool = Field(
        False, description="Skip and count malformed records instead of stopping at the first one."
    )
    max_records: PositiveInt | None = Field(
        None, description="Read at most this many records (after skipping bad ones).")
    builtin_records: PositiveInt = Field(
        2000, description="How many records 'builtin:tasks' generates."
    )
    preparation: Literal["auto", "driver", "ray_data"] = Field(
        "auto", description="Who tokenizes: 'driver' (one process, streaming), 'ray_data' (a Ray Data pipeline: "
        "chunks of the JSONL or Parquet files on actors across the cluster, the same rows in the same order), or "
        "'auto': ray_data for JSONL or Parquet data of 64 MiB or more without data.max_records, else the driver.")
    preparation_actors: PositiveInt | None = Field(
        None, description="Ray Data actors that tokenize (one CPU each, the tokenizer loaded once per actor); "
        "default: the cluster's CPUs, at most one per chunk.")
    streaming: Literal["auto", "always", "never"] = Field(
        "auto", description="How workers get the training split: from Ray's object store ('never'), or read from "
        "its Parquet files in storage a window of row groups at a time ('always'); 'auto' streams a split larger "
        "than data.object_store_share of the cluster's object store. Streaming needs storage every node reads "
        "(s3://, gs://, or a shared folder).")
    object_store_share: Float = Field(
        0.3, gt=0.0, le=1.0, description="With data.streaming=auto: the share of the object store a training "
                                         "split may take before it streams from storage instead.")
    shuffle_window_row_groups: PositiveInt = Field(
        16, description="A streamed split's epoch order: its row groups (4,096 rows) permuted, and rows shuffled "
        "within each window of this many (what a worker holds at once, twice over); a split of at most this many "
        "row groups is permuted whole, as in the object store.")
    prepared_root: str | None = Field(
        None, description="Where tokenized datasets are kept, one folder per fingerprint of what decides their "
        "rows (data files and their sizes and times, format, template, tokenizer, train.max_seq_len, packing, "
        "split), shared by every run, sweep trial and re-run that names it; default: run.storage/_prepared.")
    builtin_families: list[str] | None = Field(
        None, description="Task families 'builtin:tasks' draws from (default: all 13, listed in an error for a wrong "
        "name); a domain's families tune a domain model, leaving families out measures task generalization."
    )

    @field_validator("path")
    @classmethod
    def _data_uri(cls, value: str) -> str:
        return _checked_uri(value)

    @field_validator("eval_path", "prepared_root")
    @classmethod
    def _optional_uri(cls, value: str | None) -> str | None:
        return None if value is None else _checked_uri(value)

    @field_validator("builtin_families")
    @classmethod
    def _known_families(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        known = list(BUILTIN_FAMILIES)
        unknown = [name for name in value if name not in known]
        if unknown or not value:
            raise ValueError(f"unknown task families {unknown or value}; allowed: {', '.join(known)}")
        return value


class LoraSection(Section):
    rank: PositiveInt = Field(16, description="LoRA rank r (the survey uses 16).")
    alpha: Float = Field(32.0, gt=0, description="LoRA scaling alpha; the update is scaled by alpha / rank.")
    dropout: Float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear modules that get LoRA adapters (the default suits LLaMA, Qwen2 and Mistral "
        "alike), or [all-linear]: every linear layer but the output head, as peft offers.",
    )
    quantization: Literal["int8", "nf4", "none"] = Field(
        "int8", description="The frozen base's weights: 'int8' (bitsandbytes LLM.int8(), the survey's), 'nf4' "
        "(4-bit NormalFloat with double quantization, as QLoRA) or 'none' (16-bit).")
    int8: Bool | None = Field(None, description="Replaced by lora.quantization (int8 | nf4 | none).")
    merge: Bool = Field(False, description="Also export a full model with the adapter merged in.")
    gradient_checkpointing: Bool = Field(
        True, description="Recompute the frozen base's activations in backward to save memory (the survey's LoRA "
                          "batches fit only with it).")


    @property
    def peft_target_modules(self) -> list[str] | str:
        """What peft's LoraConfig takes: the names, or its "all-linear" shorthand."""
        return ALL_LINEAR if list(self.target_modules) == [ALL_LINEAR] else list(self.target_modules)

    @field_validator("int8")
    @classmethod
    def _replaced(cls, value: bool | None) -> None:
        if value is not None:
            raise ValueError(f"lora.int8 was replaced by lora.quantization: use lora.quantization="
                             f"{'int8' if value else 'none'} (or nf4 for a 4-bit base)")
        return None


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage for method 'full' (the survey uses 3).")
    bf16: Bool = Field(True, description="Train in BF16 mixed precision.")
    gradient_checkpointing: Bool = Field(True, description="Recompute activations in backward to save memory "
                                                           "(method 'full'; LoRA has lora.gradient_checkpointing).")
    offload_optimizer: Bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO-Offload).")


class ScalingSection(Section):
    num_workers: PositiveInt = Field(1, description="Data-parallel Ray Train workers (one GPU each with use_gpu).")
    use_gpu: Bool = Field(False, description="One GPU per worker (NCCL); false runs on CPU over gloo.")
    server_type: ServerTypeChoice = Field(
        "any", description="Place workers on nodes of this server type (its custom Ray resource), or anywhere."
    )
    cpus_per_worker: PositiveInt = Field(1, description="CPUs reserved per worker.")
    placement_timeout_s: Float = Field(
        60.0, ge=0, description="How long to wait for nodes of scaling.server_type to join (an autoscaler adding "
        "them) before failing; 0 fails at once.",
    )


class TrainSection(Section):
    epochs: PositiveInt = Field(3, description="Passes over the training split (the survey uses 3).")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps, if set.")
    max_seq_len: Annotated[int, Strict(), Field(ge=8, le=1_048_576)] = Field(
        512, description="Tokens per sequence; longer examples are truncated (the survey uses 512)."
    )
    micro_batch_size: PositiveInt = Field(4, description="Sequences per device per forward pass.")
    gradient_accumulation_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    learning_rate: Float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: Float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up linearly.")
    weight_decay: Float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: Float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: Int = Field(42, description="Seed for data order, dropout and initialisation.")
    eval_every_steps: PositiveInt = Field(
        50, description="Compute eval loss and save a checkpoint every this many steps (and at the end)."
    )
    loss_implementation: Literal["auto", "chunked", "liger", "full"] = Field(
        "auto", description="How the loss meets the vocabulary: 'chunked' runs the output head and the "
        "cross-entropy a chunk of tokens at a time, so the full [tokens x vocab] logits never exist; 'liger' is "
        "Liger's fused kernel (CUDA, LoRA, the liger extra); 'full' is the model's own loss; 'auto' is liger "
        "where it can run, else chunked for LLaMA/Mistral/Qwen/Phi-3 models, else full.",
    )
    loss_chunk_tokens: Annotated[int, Strict(), Field(ge=16, le=65_536)] = Field(
        256, description="Most tokens per chunk of the chunked loss, whose logits peak is this many tokens x vocab: "
        "every micro-batch is cut into micro_batch_size x max_seq_len / loss_chunk_tokens equal chunks.",
    )


class RunSection(Section):
    name: str = Field("raytune-it", description="Run folder name; re-running with the same name resumes the run.")
    storage: str = Field(
        "./runs", description="Where runs write their outputs: storage/name/. A local folder (one node, or a "
        "mount every node shares) or a URI: s3://bucket/prefix (an S3-compatible endpoint: "
        "?endpoint_override=host:port&scheme=http or AWS_ENDPOINT_URL), gs://bucket/prefix, file:///path. "
        "Credentials come from each node's environment, never the URI."
    )
    keep_checkpoints: PositiveInt = Field(
        2, description="Checkpoints kept: the best N by eval loss (CheckpointConfig).")
    max_failures: Int = Field(
        2, ge=-1, description="Restarts of the worker group after a worker dies, from the last checkpoint "
        "(FailureConfig); -1: no limit.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-', starting alphanumeric")
        return value

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, value: str) -> str:
        return _checked_uri(value)


class TuneSection(Section):
    """Ray Tune sweep settings (``raytune-it sweep``)."""

    search_space: dict[str, Any] = Field(
        default_factory=dict,
        description="Config paths to sweep: a list of values (e.g. lora.rank: [4, 8, 16]), or "
        "{loguniform: [low, high]}, {uniform: [low, high]}, {choice: [...]} for random search.",
    )
    search: Literal["grid", "random"] = Field("grid", description="Grid: every combination; random: num_samples draws.")
    num_samples: PositiveInt = Field(8, description="Trials drawn by random search (grid ignores it).")
    seed: Int = Field(0, description="Seed for random search draws.")
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA stops weak trials early on eval loss.")
    grace_period_steps: PositiveInt | None = Field(
        None, description="Steps every trial runs before ASHA may stop it; default: train.eval_every_steps (a trial "
                          "shorter than that evaluates 4 times, and its first eval step is the default). At most the "
                          "shortest trial's train.max_steps.")
    reduction_factor: Float = Field(2.0, gt=1.0, description="ASHA keeps 1 / reduction_factor of trials per rung.")
    max_concurrent_trials: PositiveInt | None = Field(
        None, description="Trials at once; default: as many as the cluster's CPUs and GPUs allow.")
    memory_budget_gib: Float | None = Field(
        None, gt=0, description="Per-device memory a trial may use; default: the server type's GPU memory "
        "(no limit for server_type any on CPU). Combinations estimated above it are skipped.")


class AutoscalingSection(Section):
    min_replicas: Annotated[int, Strict(), Field(ge=0)] = Field(1, description="Fewest replicas.")
    max_replicas: PositiveInt = Field(2, description="Most replicas.")
    target_ongoing_requests: Float = Field(2.0, gt=0, description="Requests per replica the autoscaler aims for.")


class ServeSection(Section):
    """Ray Serve settings (``raytune-it serve``)."""

    base_model: str = Field("tiny-llama", description="Base (or merged full) model: a HF model directory, "
                            "storage URI, hub id or tiny-llama.")
    model_name: str | None = Field(None, description="Name clients use for the base model; default: its folder name.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> peft adapter directory "
                                     "or storage URI (fetched into the replica node's cache). Loaded on first "
                                     "request, like those under adapter_root.")
    adapter_root: str | None = Field(None, description="A folder or storage URI whose every adapter is servable "
                                     "by its folder name without redeploying: <root>/<name>/ (a peft adapter) or "
                                     "<root>/<name>/export/ (a raytune-it run). Loaded on first request.")
    max_adapters_per_replica: PositiveInt = Field(
        8, description="Adapters one replica keeps loaded (least recently used evicted); Serve routes a request "
        "to a replica that holds its adapter.")
    max_lora_rank: PositiveInt | None = Field(
        None, description="vLLM: largest LoRA rank servable (its memory is reserved at start); default: the largest "
        "rank among the adapters there are at start, at least 8.")
    kv_cache_gib: Float | None = Field(
        None, gt=0, description="vLLM: KV cache size per replica; default: vLLM's share of GPU memory, 1 GiB on CPU.")
    enforce_eager: Bool = Field(
        False, description="vLLM: no torch.compile or CUDA graphs (starts in seconds instead of a minute; slower).")
    host: str = Field("127.0.0.1", description="HTTP bind address: an IP address or a hostname; 0.0.0.0 exposes "
                      "it to the network.")
    port: Annotated[int, Strict(), Field(ge=1, le=65535)] = Field(8000, description="HTTP port.")
    api_key: str | None = Field(None, description="If set, requests need 'Authorization: Bearer <key>' "
                                "(also read from RAYTUNE_IT_API_KEY). Never saved with a run's config.")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Inference engine; auto: vllm where installed and a GPU exists, else transformers.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU.")
    use_gpu: Bool = Field(False, description="One GPU per replica.")
    cpus_per_replica: PositiveInt = Field(1, description="CPUs per replica (Ray sets the replica's torch threads "
                                          "to this: raise it for CPU inference).")
    num_replicas: PositiveInt = Field(1, description="Replicas, when autoscaling is not set.")
    autoscaling: AutoscalingSection | None = Field(None, description="Autoscale replicas on ongoing requests.")
    max_ongoing_requests: PositiveInt | None = Field(
        None, description="Requests one replica holds at once; more queue. Default: 64 for vLLM (its continuous "
        "batch), 4 for transformers (it generates one at a time).")
    max_queued_requests: Int = Field(64, ge=-1, description="Requests queued per deployment before clients get "
                                     "503; -1: unbounded.")
    server_type: ServerTypeChoice = Field("any", description="Place replicas on nodes of this server type.")
    max_model_len: PositiveInt = Field(2048, description="Prompt plus completion tokens, at most.")
    max_tokens_limit: PositiveInt = Field(1024, description="Largest max_tokens a request may ask for.")
    max_body_bytes: PositiveInt = Field(1_000_000, description="Largest request body; bigger gets 413.")
    app_name: str = Field("raytune-it", description="Ray Serve application name.")
    api_keys_file: str | None = Field(
        None, description="A YAML file mapping organization names to API keys (a key, or a list): each key may be "
        "written as sha256:<hex digest> instead. Each organization sees only its own files, jobs and models; "
        "serve.api_key, if set too, is the organization 'default'.")
    fine_tuning: Bool = Field(
        False, description="Also serve OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs): each job is a "
        "Ray Job of raytune-it train on this config with the job's file and hyperparameters; files, jobs and runs "
        "live in run.storage/fine_tuning/, and a finished adapter is served by this app as ft:<base>:<org>:...")
    max_file_bytes: PositiveInt = Field(
        512 * 2**20, description="Largest file an upload to /v1/files may send; bigger gets 413.")
    max_running_jobs: PositiveInt = Field(
        1, description="Fine-tuning jobs running at once; the others wait as 'queued', first come first served.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not SAFE_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-', "
                                 "starting alphanumeric")
        for path in value.values():
            _checked_uri(path)
        return value

    @field_validator("base_model")
    @classmethod
    def _base_uri(cls, value: str) -> str:
        return _checked_uri(value)

    @field_validator("host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        if not is_host(value):
            raise ValueError(f"{value!r} is neither an IP address nor a hostname; use 127.0.0.1 (this machine "
                             "only), 0.0.0.0 (every interface) or a name such as localhost")
        return value

    def resolved_api_key(self) -> str | None:
        """The key requests need: ``serve.api_key``, else RAYTUNE_IT_API_KEY in this process's environment,
        else none (no key required). The one rule for the key, wherever it is read."""
        import os

        return self.api_key or os.environ.get(API_KEY_ENV) or None

    @field_validator("api_key")
    @classmethod
    def _chosen_key(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value.strip() == "<redacted>"):
            raise ValueError("an API key must be a chosen secret (this one is empty or the '<redacted>' placeholder "
                             "of an old saved config); set it with RAYTUNE_IT_API_KEY or serve.api_key=...")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_local(cls, value: str | None) -> str | None:
        from raytune_it.storage import is_uri

        if value is not None and is_uri(value):
            raise ValueError("must be a file on the machine that runs raytune-it serve (its keys are read there, "
                             "and only their digests reach the replicas)")
        return value

    @field_validator("adapter_root")
    @classmethod
    def _root_uri(cls, value: str | None) -> str | None:
        return None if value is None else _checked_uri(value)


BUILTIN_DATA = "builtin:tasks"


class EvalDataSection(Section):
    """The records eval scores on (and, for adapters it trains, tunes on): the generated task families by
    default, or the user's own file with a family field."""

    path: str = Field(BUILTIN_DATA, description="Records with a task family each: a .json, .jsonl or .parquet "
                      "file (local path or storage URI) in eval.data.format, or 'builtin:tasks' (the generated "
                      "families, examples drawn with a seed training never uses).")
    format: Literal["alpaca", "messages", "sharegpt"] = Field(
        "alpaca", description="Record format, as data.format; a conversation's last assistant turn is the reference.")
    file_type: Literal["auto", "json", "jsonl", "parquet"] = Field("auto", description="As data.file_type.")
    skip_bad_records: Bool = Field(False, description="Skip and count malformed records instead of stopping.")

    @field_validator("path")
    @classmethod
    def _data_uri(cls, value: str) -> str:
        return _checked_uri(value)


class JudgeSection(Section):
    """An OpenAI-compatible model that compares two answers (``eval.judge``)."""

    url: str = Field(description="Base URL of an OpenAI-compatible API (http://127.0.0.1:8000/v1 for raytune-it "
                     "serve); its /chat/completions is called.")
    model: str = Field(description="The judge model's name at that endpoint.")
    api_key_env: str | None = Field(None, description="Name of the environment variable that holds the endpoint's "
                                    "API key (the key itself never goes in a config).")
    max_examples: PositiveInt = Field(24, description="Examples judged per effect (each twice, answers swapped).")
    timeout_s: Float = Field(60.0, gt=0, description="Seconds per judge request.")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        from raytune_it.storage import has_credentials

        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if has_credentials(value):
            raise ValueError("credentials in the URL would be saved with the run; use eval.judge.api_key_env")
        return value.rstrip("/")


class EvalSection(Section):
    """The three effects of instruction tuning (``raytune-it eval``): on the generated task families, or on
    any dataset whose records name their task family (``eval.data``, ``eval.family_field``)."""

    data: EvalDataSection = Field(default_factory=EvalDataSection)
    family_field: str = Field("family", min_length=1, description="The record field that holds its task family "
                              "(Dolly's 'category', for example); the generated tasks use 'family'.")
    held_out_families: list[str] = Field(
        ["bmi", "percent_change", "reverse_words"],
        description="Families (values of eval.family_field) left out of the tuned models' training: task "
                    "generalization is measured on them.")
    domain: str = Field(
        "medicine", description="The domain's name: its adapter is compared with the general one (domain "
        "specialization). For builtin:tasks one of medicine, law, finance, unless eval.domain_families is set.")
    domain_families: list[str] | None = Field(
        None, description="The domain's families, by value; default for builtin:tasks: the domain's generated "
        "families. Required with eval.data.path.")
    examples_per_family: PositiveInt = Field(12, description="Held-out examples per family (unseen in training).")
    max_new_tokens: PositiveInt = Field(40, description="Greedy decoding length for each answer.")
    batch_size: PositiveInt | None = Field(
        None, description="Prompts per engine call; default: the engine's own (transformers: 16, padded into one "
        "batch; vLLM: as many as its scheduler runs at once, 128 by default).")
    train_steps: PositiveInt = Field(
        80, description="Steps for each adapter eval trains itself (the general and the domain one) when "
        "eval.models does not name them.")
    models: dict[str, str] = Field(
        {}, description="Extra or given models, name -> model or adapter directory (or storage URI). 'general' "
        "and the domain's name replace the adapters eval would train; 'base' is always model.name_or_path.")
    judge: JudgeSection | None = Field(None, description="Also compare each effect's answers pairwise with a judge "
                                       "model (win rates, both answer orders).")

    @field_validator("models")
    @classmethod
    def _model_uris(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value.values():
            _checked_uri(path)
        return value

    @field_validator("domain")
    @classmethod
    def _domain_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value) or value in ("base", "general"):
            raise ValueError("must be letters, digits, '.', '_' or '-', starting alphanumeric, and not 'base' or "
                             "'general' (it names the domain's model beside those)")
        return value

    @model_validator(mode="after")
    def _families_exist(self) -> "EvalSection":
        """On the generated tasks the families are known before anything runs; on a user's file they are
        checked against its records when eval reads it."""
        if self.data.path != BUILTIN_DATA:
            if not self.domain_families:
                raise ValueError("eval.domain_families: name the domain's families (values of eval.family_field "
                                 "in eval.data.path), e.g. eval.domain_families=[open_qa,closed_qa]")
            return self
        DataSection._known_families(self.held_out_families or None)
        if self.domain_families is not None:
            DataSection._known_families(self.domain_families)
        elif self.domain not in set(BUILTIN_FAMILIES.values()) - {"general"}:
            raise ValueError(f"eval.domain {self.domain!r} has no generated families; allowed: "
                             f"{', '.join(sorted(set(BUILTIN_FAMILIES.values()) - {'general'}))}, or set "
                             "eval.domain_families")
        return self


class GenerateSection(Section):
    """Offline batch inference (``raytune-it generate``): models over data.path on Ray Data, rows to storage."""

    models: dict[str, str] = Field(
        {}, description="Models to run, name -> base model, full export or peft adapter (folder or storage URI); "
        "default: the base model (model.name_or_path) as 'base'. Several adapters run in one pass.")
    max_new_tokens: PositiveInt = Field(128, description="Most tokens each completion generates.")
    temperature: Float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (batched); above: sampled with "
                               "generate.seed, one prompt at a time on the transformers engine.")
    top_p: Float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: Int = Field(0, description="Sampling seed.")
    output_format: Literal["jsonl", "parquet"] = Field("jsonl", description="Files written per block.")
    block_rows: PositiveInt = Field(256, description="Input rows per output file: the unit of progress and of "
                                    "resume (a re-run of the same job skips blocks already written).")
    batch_size: PositiveInt | None = Field(
        None, description="Prompts per engine call; default: the engine's own (transformers: 16, padded into one "
        "batch; vLLM: as many as its scheduler runs at once, 128 by default).")
    num_actors: PositiveInt = Field(1, description="Engine replicas: a Ray Data actor pool spread over the cluster.")
    cpus_per_actor: PositiveInt = Field(1, description="CPUs each actor reserves (its torch threads).")
    use_gpu: Bool = Field(False, description="One GPU per actor.")

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not SAFE_NAME.match(name):
                raise ValueError(f"model name {name!r} names a folder: letters, digits, '.', '_' or '-', "
                                 "starting alphanumeric")
            _checked_uri(path)
        return value


class TrackingSection(Section):
    """Experiment tracking (``raytune-it train``, ``sweep`` and ``run``): nothing is logged unless a backend is set."""

    backend: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="Where runs log their config, every step's metrics, the summary and the export "
        "location: MLflow or Weights & Biases (install raytune-it[trackers]); 'none' logs nothing.")
    uri: str | None = Field(
        None, description="MLflow: the tracking URI (http://host:5000, a folder, databricks); W&B: a self-hosted "
        "server's base URL. Default: the library's own (MLFLOW_TRACKING_URI, WANDB_BASE_URL). Credentials come "
        "from the environment (MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD, WANDB_API_KEY), never the URI.")
    experiment: str = Field(
        "raytune-it", min_length=1, max_length=128,
        description="MLflow experiment or W&B project the runs go to; a sweep's trials are nested under the "
        "sweep's run (MLflow) or grouped by its name (W&B).")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        from raytune_it.storage import has_credentials

        if value is not None and has_credentials(value):
            raise ValueError("credentials in the URI would be saved in config.yaml and shown in logs; remove them "
                             "and set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD) for MLflow, WANDB_API_KEY for W&B")
        return value

    @field_validator("experiment")
    @classmethod
    def _project_name(cls, value: str) -> str:
        # W&B refuses these in project names; MLflow accepts them, but one rule keeps a config portable.
        bad = "".join(sorted({c for c in value if c in NOT_IN_EXPERIMENT or not c.isprintable()}))
        if bad or value != value.strip():
            raise ValueError(f"must be printable, without surrounding spaces or any of {NOT_IN_EXPERIMENT!r}"
                             + (f" (found {bad!r})" if bad else ""))
        return value


class EndToEndSection(Section):
    """What ``raytune-it run`` adds: the full-tuning run it sets beside the LoRA sweep, and the latency probe."""

    full_overrides: list[str] = Field(
        ["method=full", "scaling.num_workers=2", "train.micro_batch_size=4", "train.learning_rate=1.0e-3"],
        description="Dotted overrides that turn this config into the full-tuning (ZeRO-3) run.")
    latency_max_tokens: PositiveInt = Field(32, description="Tokens each batch-1 latency run generates.")
    latency_repeats: PositiveInt = Field(3, description="Batch-1 latency runs per served model (the median counts).")


class JobConfig(Section):
    """Everything one job needs. Build it with :func:`raytune_it.load_config`."""

    method: Literal["full", "lora"] = Field("lora", description="'full': DeepSpeed ZeRO full tuning; 'lora': LoRA.")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    e2e: EndToEndSection = Field(default_factory=EndToEndSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _completions_fit_the_context(self) -> "JobConfig":
        # Else every row of 'generate' or every answer of 'eval' would fail alone, after Ray had started.
        limit = self.serve.max_model_len
        for key, value in (("generate.max_new_tokens", self.generate.max_new_tokens),
                           ("eval.max_new_tokens", self.eval.max_new_tokens)):
            if value >= limit:
                raise ValueError(f"{key}={value} leaves no room for a prompt in serve.max_model_len={limit}; set "
                                 f"{key} below {limit} (or raise serve.max_model_len, up to the model's context)")
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether this job recomputes activations: the setting of its method's own section."""
        return self.lora.gradient_checkpointing if self.method == "lora" else self.deepspeed.gradient_checkpointing

    def to_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        """The config as data. Secrets (``SECRETS``) are left out unless asked for: this dict is saved in run
        folders, sweep state and trial configs, and a saved secret would be both a leak and, read back, a
        key nobody chose."""
        data = self.model_dump(mode="json")
        if not include_secrets:
            for section, key in SECRETS:
                data[section][key] = None
        return data

    def to_yaml(self) -> str:
        """YAML for people and run folders, without secrets (set them again, or by environment)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation
    for name, info in JobConfig.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
}
