"""What ``raytune-it plan`` was asked about: a parameter count, a model directory or a job config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from raytune_it.errors import ConfigError
from raytune_it.plan.memory import (
    LLAMA_SHAPES,
    NAMED_SHAPES,
    ModelShape,
    parse_parameter_count,
    shape_from_hf_config,
    shape_from_parameter_count,
)
from raytune_it.plan.planner import Workload, workload_from_config


def shape_for(target: str) -> ModelShape | None:
    """A model shape from '7B' or a directory with config.json; None when ``target`` is neither."""
    if target.upper() in LLAMA_SHAPES:
        return LLAMA_SHAPES[target.upper()]
    if target.upper() in NAMED_SHAPES:
        return NAMED_SHAPES[target.upper()]
    count = parse_parameter_count(target)
    if count is not None:
        if count < 1e6:
            raise ConfigError(f"model {target!r}: a parameter count needs a unit, e.g. 7B or 350M")
        return shape_from_parameter_count(count)
    if (Path(target) / "config.json").is_file():
        return shape_from_hf_config(target)
    return None


def measure_data(data: Any, tokenizer_source: str, seq_len: int) -> dict[str, float]:
    """Training records and mean tokens per record, through the same pipeline (template, split) training uses."""
    from raytune_it.data.pipeline import dataset_stats
    from raytune_it.models.loading import load_tokenizer

    stats = dataset_stats(data, load_tokenizer(tokenizer_source), seq_len, 0)
    if not stats.train_records:
        raise ConfigError(f"{data.path}: no usable training records")
    return {"records": stats.train_records, "mean_tokens": stats.mean_length}


def resolve_workload(
    target: str | None,
    overrides: Sequence[str] = (),
    *,
    method: str | None = None,
    server_type: str | None = None,
    seq_len: int | None = None,
    records: int | None = None,
    mean_tokens: float | None = None,
    data: str | None = None,
    tokenizer: str | None = None,
    epochs: float | None = None,
    global_batch: int | None = None,
    lora_targets: list[str] | None = None,
) -> Workload:
    """Flags override what a config says; a bare model takes the survey's defaults for the rest."""
    target = target or "tiny-lora"
    shape = shape_for(target) if not overrides else None
    config = None
    if shape is None:
        from raytune_it.config import load_config

        try:
            config = load_config(target, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n(plan takes a parameter count such as 7B, a model directory with config.json, "
                              "or a job config: a preset name or YAML path)") from None
    from raytune_it.config.paths import check_data_path, check_tokenizer_path
    from raytune_it.config.schema import DataSection

    fields: dict[str, Any] = {}
    if data is not None:
        check_data_path(data, "--data")
    if tokenizer is not None:
        check_tokenizer_path(tokenizer, "--tokenizer")
    data_section = DataSection(path=data, eval_fraction=0.0) if data is not None else None
    if config is not None:
        workload = workload_from_config(config, server_type=server_type)
        tokenizer = tokenizer or config.model.name_or_path
        if data_section is None and records is None:
            data_section = config.data
    else:
        assert shape is not None  # no config: target named a shape
        workload = Workload(shape=shape, method=method or "full",  # type: ignore[arg-type]  # checked by argparse
                            server_type=server_type or "a800-80g")
        if Path(target).is_dir():
            tokenizer = tokenizer or target
    for key, value in (("method", method), ("server_type", server_type), ("seq_len", seq_len), ("epochs", epochs),
                       ("global_batch", global_batch), ("records", records), ("mean_tokens", mean_tokens),
                       ("lora_targets", lora_targets)):
        if value is not None:
            fields[key] = value
    workload = replace(workload, **fields)
    if data_section is not None and records is None:
        if tokenizer is None:
            raise ConfigError(f"--data {data}: counting tokens needs the model's tokenizer; pass --tokenizer "
                              "MODEL_DIR, or give --records and --mean-tokens instead")
        measured = measure_data(data_section, tokenizer, workload.seq_len)
        workload = replace(workload, records=int(measured["records"]),
                           mean_tokens=mean_tokens if mean_tokens is not None else round(measured["mean_tokens"], 1))
    return workload
