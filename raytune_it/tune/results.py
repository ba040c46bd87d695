"""A sweep's results: one row per trial, as CSV, Parquet, a printed table, plots and ``best/``.

Everything is written through the sweep folder's storage Location; ``best/`` is
published (``raytune_it.storage.publish_dir``), so it is never seen half copied.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from raytune_it.config.schema import JobConfig
from raytune_it.storage import Location, publish_dir
from raytune_it.train.driver import read_history
from raytune_it.train.step_metrics import step_eval_loss
from raytune_it.train.summary import measured
from raytune_it.tune.layout import trial_dir, trial_name
from raytune_it.tune.space import Trial

STATUS_FINISHED, STATUS_STOPPED, STATUS_SKIPPED, STATUS_FAILED = "finished", "stopped early", "skipped", "failed"


#: The numbers a trial's row shows: a finished trial's summary, or what a stopped one's steps measured
#: (both ``train.summary.measured``, so the two agree).
ROW_NUMBERS = ("final_eval_loss", "tokens_per_second", "peak_memory_bytes", "tuning_seconds", "steps")


def _trial_metrics(folder: Location) -> dict[str, Any]:
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        numbers = json.loads(summary_path.read_text())
    else:
        history = read_history(folder / "metrics.jsonl")
        if not history:
            return {}
        numbers = measured(history)
    return {key: numbers[key] for key in ROW_NUMBERS}


def collect_rows(config: JobConfig, trials: list[Trial], grid: Any, trials_dir: Location) -> list[dict]:
    results = {}
    if grid is not None:
        for result in grid:
            results[result.config["trial"]] = result
    rows = []
    for trial in trials:
        row: dict[str, Any] = {"trial": trial.index, **trial.params, "status": "", "reason": "",
                               **dict.fromkeys(ROW_NUMBERS), "steps": 0,
                               "estimated_memory_gib": round(trial.memory_bytes / 2**30, 2)
                               if trial.memory_bytes else None}
        if trial.skipped_reason:
            row.update(status=STATUS_SKIPPED, reason=trial.skipped_reason)
            rows.append(row)
            continue
        folder = trials_dir / trial_name(trial.index)
        row.update(_trial_metrics(folder))
        result = results.get(trial.index)
        if result is not None and result.error is not None:
            row.update(status=STATUS_FAILED, reason=str(result.error).strip().splitlines()[-1][:300])
        elif (folder / "summary.json").is_file():
            row["status"] = STATUS_FINISHED
        else:
            # The trial was stopped mid-run: Tune's last result is more current than its metrics file.
            last = (result.metrics or {}) if result is not None else {}
            if last.get("step"):
                row["steps"] = last["step"]
            if step_eval_loss(last) is not None and math.isfinite(last["eval_loss"]):
                row["final_eval_loss"] = last["eval_loss"]
            row.update(status=STATUS_STOPPED, reason=f"ASHA stopped it after step {row['steps']}")
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict | None:
    finished = [r for r in rows if r["status"] == STATUS_FINISHED and r["final_eval_loss"] is not None]
    return min(finished, key=lambda r: r["final_eval_loss"]) if finished else None


def _save(fig: Any, target: Location) -> Location:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    target.write_bytes(buffer.getvalue())
    return target


def _plot(rows: list[dict], swept: list[str], folder: Location) -> list[Location]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r["final_eval_loss"] is not None]
    x_key = "lora.rank" if "lora.rank" in swept else swept[0]
    group_key = "train.micro_batch_size" if "train.micro_batch_size" in swept and x_key != \
        "train.micro_batch_size" else None
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in sorted({r.get(group_key) for r in done}, key=str):
        points = sorted((r[x_key], r["final_eval_loss"]) for r in done if r.get(group_key) == group)
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{group_key}={group}" if group_key else "trials")
    ax.set_xlabel(x_key)
    ax.set_ylabel("final eval loss")
    if x_key == "lora.rank":
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[x_key] for r in done}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("Eval loss by " + x_key)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, folder / ("eval_loss_vs_rank.png" if x_key == "lora.rank" else "eval_loss.png")))
    plt.close(fig)

    batch_key = "train.micro_batch_size"
    fig, ax = plt.subplots(figsize=(6, 4))
    rated = [r for r in rows if r["tokens_per_second"]]
    key = batch_key if batch_key in swept else x_key
    ax.scatter([r[key] for r in rated], [r["tokens_per_second"] for r in rated])
    for r in rated:
        ax.annotate(f"#{r['trial']}", (r[key], r["tokens_per_second"]), fontsize=7)
    ax.set_xlabel(key)
    ax.set_ylabel("training tokens / s")
    ax.set_title("Throughput by " + key)
    fig.tight_layout()
    written.append(_save(fig, folder / "throughput_vs_batch_size.png"))
    plt.close(fig)
    return written


def write_outputs(config: JobConfig, rows: list[dict], folder: Location, console: Any) -> dict | None:
    import pandas as pd
    from rich.table import Table

    swept = list(config.tune.search_space)
    frame = pd.DataFrame(rows)
    (folder / "results.csv").write_text(frame.to_csv(index=False))
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    (folder / "results.parquet").write_bytes(parquet.getvalue())
    if any(r["final_eval_loss"] is not None for r in rows):
        _plot(rows, swept, folder)
    best = best_row(rows)
    target = folder / "best"
    if best is not None:
        best_dir = trial_dir(folder, best["trial"])
        publish_dir(best_dir / "export", target, extra={
            "config.yaml": (best_dir / "config.yaml").read_text(),
            "best.json": json.dumps(best, indent=2, default=str)})

    table = Table(title=f"sweep {config.run.name}: {len(rows)} trials")
    columns = ["trial", *swept, "status", "final_eval_loss", "tokens_per_second", "steps", "reason"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append("-" if value is None else f"{value:.4f}" if isinstance(value, float) and
                         column == "final_eval_loss" else f"{value:,.0f}" if isinstance(value, float) else str(value))
        style = "bold green" if best is not None and row["trial"] == best["trial"] else None
        table.add_row(*cells, style=style)
    console.print(table)
    if best is not None:
        console.print(f"best: trial {best['trial']} (eval loss {best['final_eval_loss']:.4f}) -> {target.uri}",
                      markup=False, highlight=False)
    console.print(f"results: {(folder / 'results.csv').uri}", markup=False, highlight=False)
    return best
