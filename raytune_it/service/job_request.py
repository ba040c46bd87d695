"""``POST /v1/fine_tuning/jobs``: the request, and the JobConfig it becomes.

A job trains the app's own config (the preset or YAML ``raytune-it serve`` was given) on the job's files,
with OpenAI's hyperparameters mapped onto it. ``"auto"`` is resolved the survey's way: 3 epochs, the
planner's batch for the config's server type (the config's own batch where it names none), the config's
learning rate. The vendor extension ``raytune_it`` (``extra_body={"raytune_it": {...}}`` in the openai SDK)
sets more of the config, but only the keys in ``ALLOWED_OVERRIDES``: nothing that reaches the operator's
machines, storage or secrets (model paths, ``run.*``, ``serve.*``, ``tracking.*``, ``trust_remote_code``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, field_validator

from raytune_it.config.schema import JobConfig
from raytune_it.errors import ConfigError
from raytune_it.service.errors import ApiError
from raytune_it.service.names import SUFFIX

AUTO_EPOCHS = 3  # the survey's
ALLOWED_OVERRIDES = (
    "method",
    "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.quantization",
    "lora.gradient_checkpointing",
    "deepspeed.zero_stage", "deepspeed.gradient_checkpointing", "deepspeed.offload_optimizer",
    "scaling.server_type", "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker",
    "train.max_steps", "train.eval_every_steps", "train.max_seq_len", "train.micro_batch_size",
    "train.gradient_accumulation_steps", "train.lr_schedule", "train.warmup_ratio", "train.weight_decay",
    "train.max_grad_norm",
    "data.template", "data.packing", "data.group_by_length", "data.eval_fraction",
)

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Strict(), Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Strict(), Field(ge=1, le=4096)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: Supervised | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = None
    raytune_it: dict[str, Any] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX.match(value):
            raise ValueError("1-64 letters, digits, '_' or '-' (it becomes part of the model's name)")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations are not offered: runs are tracked where the operator set "
                             "tracking.* (MLflow or W&B)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value

    def chosen_hyperparameters(self) -> Hyperparameters:
        """``method.supervised.hyperparameters`` (OpenAI's current place), else the top-level ones."""
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def checked_overrides(extra: dict[str, Any] | None) -> dict[str, Any]:
    for key in extra or {}:
        if key not in ALLOWED_OVERRIDES:
            raise ApiError(400, f"raytune_it.{key}: not a setting a fine-tuning job may change; allowed: "
                                f"{', '.join(ALLOWED_OVERRIDES)}", "forbidden_override", f"raytune_it.{key}")
    return dict(extra or {})


def _derive(config: JobConfig, changes: dict[str, Any]) -> JobConfig:
    from raytune_it.config.loading import with_overrides

    try:
        return with_overrides(config, changes, "the fine-tuning job")
    except ConfigError as exc:
        detail = str(exc).split(":\n", 1)[-1].strip()
        raise ApiError(400, detail, "invalid_hyperparameters", "raytune_it") from None


def _batch(config: JobConfig, batch_size: int | str, records: int) -> dict[str, Any]:
    """micro_batch_size and gradient accumulation for a global batch, or the planner's for ``"auto"``."""
    workers = config.scaling.num_workers
    if batch_size == "auto":
        if config.scaling.server_type == "any":
            return {}
        from raytune_it.plan.planner import plan, workload_from_config

        chosen = plan(workload_from_config(config, records=max(records, 1)))
        if not chosen.feasible or not chosen.per_device_batch_size:
            return {}
        return {"train.micro_batch_size": chosen.per_device_batch_size,
                "train.gradient_accumulation_steps": chosen.gradient_accumulation_steps or 1}
    return {"train.micro_batch_size": max(1, math.ceil(int(batch_size) / workers)),
            "train.gradient_accumulation_steps": 1}


def build_job_config(template: JobConfig, request: JobRequest, *, base_model: str, data: dict[str, Any],
                     run_storage: str, job_id: str, records: int) -> tuple[JobConfig, dict[str, Any]]:
    """The JobConfig the job trains, and the hyperparameters it resolved to (OpenAI's three)."""
    from raytune_it.plan.planner import config_fit_problem

    overrides = checked_overrides(request.raytune_it)
    chosen = request.chosen_hyperparameters()
    # Where the job reads and writes is the service's to say; max_steps only if the client asked.
    fixed = {"model.name_or_path": base_model, **{f"data.{key}": value for key, value in data.items()},
             "data.max_records": None, "data.skip_bad_records": False, "run.storage": run_storage,
             "run.name": job_id, "train.max_steps": None, "tune.search_space": {}}
    config = _derive(template, {**fixed, **overrides})
    changes: dict[str, Any] = {
        "train.epochs": AUTO_EPOCHS if chosen.n_epochs == "auto" else chosen.n_epochs,
        "train.learning_rate": config.train.learning_rate * (
            1.0 if chosen.learning_rate_multiplier == "auto" else float(chosen.learning_rate_multiplier)),
    }
    if request.seed is not None:
        changes["train.seed"] = request.seed
    if "train.micro_batch_size" not in overrides:
        changes.update(_batch(config, chosen.batch_size, records))
    config = _derive(config, changes)
    problem = config_fit_problem(config) if chosen.batch_size != "auto" else None
    if problem:
        raise ApiError(400, f"batch_size {chosen.batch_size}: {problem}", "invalid_hyperparameters",
                       "hyperparameters.batch_size")
    _preflight(config)
    train = config.train
    resolved = {"n_epochs": train.epochs,
                "batch_size": train.micro_batch_size * train.gradient_accumulation_steps * config.scaling.num_workers,
                "learning_rate_multiplier": round(train.learning_rate / template.train.learning_rate, 6)}
    return config, resolved


def _preflight(config: JobConfig) -> None:
    """The checks ``raytune-it train`` makes before Ray starts (a LoRA rank the model can use, modules it
    has), made at creation, so a job that would fail at once is a 400 and never queues."""
    from raytune_it.train.preflight import preflight

    try:
        preflight(config)
    except ConfigError as exc:
        raise ApiError(400, str(exc), "invalid_hyperparameters", "raytune_it") from None
    except Exception:  # noqa: BLE001 - a model this process cannot shape: the job's own preflight says why
        return


def planned_seconds(config: JobConfig, records: int) -> float | None:
    """The planner's tuning time for the job on its server type, if it can say."""
    try:
        from raytune_it.plan.planner import plan, workload_from_config

        estimate = plan(workload_from_config(config, records=max(records, 1)))
    except Exception:  # noqa: BLE001 - an estimate is a nicety: a model the planner cannot shape has none
        return None
    return estimate.est_hours * 3600 if estimate.feasible and estimate.est_hours else None
