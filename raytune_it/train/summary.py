"""The run summary in the survey's Table 8 columns: printed, and written as summary.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.train.step_metrics import step_eval_loss

SUMMARY_FILE = "summary.json"


@dataclass
class RunSummary:
    run_name: str
    #: The config's value, ``full`` or ``lora``; ``method_label`` is the display text.
    method: str
    server_type: str
    device: str
    num_workers: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    steps: int
    epochs_completed: float
    #: Training, evaluation and checkpoints: the survey's tuning time.
    tuning_seconds: float
    #: Training steps only: the denominator of ``tokens_per_second``.
    train_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    wall_seconds: float
    train_tokens: int
    #: Training throughput: tokens over training-step time, eval and checkpoints excluded.
    tokens_per_second: float
    peak_memory_bytes: int
    final_train_loss: float | None
    final_eval_loss: float | None
    initial_train_loss: float | None
    restarts: int
    export_dir: str
    #: Ray node id of each worker (rank order) in the last attempt.
    worker_nodes: list[str]
    #: The set-up as the workers built it (precision, ZeRO partitioning, parameter counts).
    strategy: dict[str, Any]
    #: The key of the prepared dataset it trained on (``train/prepared.py``); None for a run that kept its own.
    dataset: str | None = None
    #: How the workers read the training split: from the object store, or streamed from storage.
    train_split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """``summary.json``'s text: the same in the run folder and in an experiment tracker."""
        return json.dumps(self.to_dict(), indent=2)

    def write(self, run_dir: Any) -> Any:
        """Into the run folder (a storage Location)."""
        path = run_dir / SUMMARY_FILE
        path.write_text(self.to_json())
        return path


def _finite(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def measured(history: list[dict]) -> dict[str, Any]:
    """What a run's steps measured, from its metrics history (``StepMetrics``, in step order): the one
    computation behind a finished run's summary and a stopped sweep trial's row."""
    last = history[-1]
    evals = [loss for m in history if (loss := step_eval_loss(m)) is not None]
    peaks = [m["peak_memory_bytes"] for m in history if "peak_memory_bytes" in m]
    train_seconds = last["train_seconds"]
    eval_seconds, checkpoint_seconds = last.get("eval_seconds", 0.0), last.get("checkpoint_seconds", 0.0)
    return dict(
        steps=last["step"],
        tuning_seconds=round(train_seconds + eval_seconds + checkpoint_seconds, 3),
        train_seconds=round(train_seconds, 3),
        eval_seconds=round(eval_seconds, 3),
        checkpoint_seconds=round(checkpoint_seconds, 3),
        train_tokens=int(last["tokens"]),
        tokens_per_second=round(last["tokens"] / train_seconds, 1) if train_seconds else 0.0,
        peak_memory_bytes=int(max(peaks)) if peaks else 0,
        final_train_loss=_finite(last["loss"]),
        final_eval_loss=evals[-1] if evals else None,
        initial_train_loss=_finite(history[0]["loss"]) if history[0]["step"] == 1 else None,
        restarts=int(last.get("restarts", 0)),
        worker_nodes=next((m["worker_nodes"] for m in reversed(history) if "worker_nodes" in m), []),
        strategy=next((m["strategy"] for m in reversed(history) if "strategy" in m), {}),
        train_split=next((m["train_split"] for m in reversed(history) if "train_split" in m), None),
    )


def build_summary(config: JobConfig, history: list[dict], steps_per_epoch: int, wall_seconds: float,
                  export_dir: str) -> RunSummary:
    numbers = measured(history)
    return RunSummary(
        run_name=config.run.name,
        method=config.method,
        server_type=config.scaling.server_type,
        device="gpu" if config.scaling.use_gpu else "cpu",
        num_workers=config.scaling.num_workers,
        per_device_batch_size=config.train.micro_batch_size,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        epochs_completed=round(numbers["steps"] / steps_per_epoch, 3),
        wall_seconds=round(wall_seconds, 3),
        export_dir=export_dir,
        **numbers,
    )


def method_label(method: str, strategy: dict[str, Any]) -> str:
    """How printed tables name a run's method, from its summary: ``full (ZeRO-3)``, ``lora (int8 base, r=16)``.
    Display text only: ``summary.json`` keeps the config's value."""
    if method == "full":
        return f"full (ZeRO-{strategy['zero_stage']})" if "zero_stage" in strategy else "full"
    base = {"int8": "INT8", "nf4": "NF4", "none": ""}.get(strategy.get("quantization") or "", "") \
        or strategy.get("base_weight_dtype", "").replace("float", "fp")
    rank = strategy.get("lora_rank")
    return f"lora ({base} base, r={rank})" if base and rank else "lora"


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    return [
        ("method", method_label(summary.method, summary.strategy)), ("server type", summary.server_type),
        ("device", summary.device),
        ("workers / GPUs", str(summary.num_workers)), ("per-device batch size", str(summary.per_device_batch_size)),
        ("gradient accumulation", str(summary.gradient_accumulation_steps)),
        ("steps (epochs)", f"{summary.steps} ({summary.epochs_completed:g})"),
        ("tuning time", f"{summary.tuning_seconds:.1f} s (wall {summary.wall_seconds:.1f} s)"),
        ("  training / eval / checkpoints",
         f"{summary.train_seconds:.1f} / {summary.eval_seconds:.1f} / {summary.checkpoint_seconds:.1f} s"),
        ("tokens processed", f"{summary.train_tokens:,}"),
        ("tokens / s (training)", f"{summary.tokens_per_second:,.0f}"),
        ("peak memory / worker", f"{summary.peak_memory_bytes / 2**30:.2f} GiB"),
        ("train loss (first -> final)", f"{loss(summary.initial_train_loss)} -> {loss(summary.final_train_loss)}"),
        ("eval loss (final)", loss(summary.final_eval_loss)),
        ("restarts", str(summary.restarts)), ("export", summary.export_dir),
    ]


def print_summary(summary: RunSummary, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"run {summary.run_name}: summary (the survey's Table 8 columns)", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for name, value in summary_rows(summary):
        table.add_row(name, value)
    console.print(table)
