"""The run report, rendered only from the files a run wrote, so ``raytune-it report RUN_DIR`` rebuilds it.

Sections: the Table 8 reproduction for this run (one row per method), the
planner's table for LLaMA 7B-65B beside the survey's published column, the sweep
(results and plots) and the evaluation (per family, and the three effects).
``report.md`` links the plots; ``report.html`` embeds them, so it is one
self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from raytune_it.errors import UserError
from raytune_it.evaluation.driver import family_rows
from raytune_it.plan.planner import Plan
from raytune_it.plan.render import SURVEY_COLUMNS, markdown_table, survey_rows
from raytune_it.run_files import read_json_object
from raytune_it.storage import Location, as_location, redact_uri
from raytune_it.train.summary import method_label
from raytune_it.tune.layout import trial_dir

TABLE8_COLUMNS = ["method", "server type", "device", "workers / GPUs", "batch / device", "grad. accum.",
                  "tuning time (s)", "train tokens/s", "peak memory / worker (GiB)", "final eval loss",
                  "inference tokens/s (batch 1)"]
REQUIRED = ("stats.json", "plan.json", "sweep/results.csv", "sweep/best/best.json", "full/summary.json",
            "serve.json", "eval/eval.json", "stages.json")


DAMAGED = "the run folder was changed, or written by another version of raytune-it: run 'raytune-it run' again"


def _load(run_dir: Location, name: str) -> Any:
    return read_json_object(run_dir / name, DAMAGED)


def collect(run_dir: Location) -> dict[str, Any]:
    missing = [name for name in REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir.uri}: not a finished 'raytune-it run' folder (missing {', '.join(missing)}); "
                        "run 'raytune-it run' first, or point at its run.storage/run.name")
    best = _load(run_dir, "sweep/best/best.json")
    return {
        "run_dir": run_dir,
        "stats": _load(run_dir, "stats.json"),
        "plan": _load(run_dir, "plan.json"),
        "sweep": _load_csv(run_dir / "sweep" / "results.csv"),
        "best": best,
        "lora": _load(trial_dir(run_dir / "sweep", _trial_number(best)), "summary.json"),
        "full": _load(run_dir, "full/summary.json"),
        "serve": _load(run_dir, "serve.json"),
        "eval": _load(run_dir, "eval/eval.json"),
        "stages": _load(run_dir, "stages.json"),
        "plots": [name for name in (run_dir / "sweep").listdir() if name.endswith(".png")],
    }


def _trial_number(best: Any) -> int:
    trial = best["trial"]
    if isinstance(trial, bool) or not isinstance(trial, int) or trial < 0:
        raise UserError(f"{best.source}: trial is {trial!r}, not a trial number; {DAMAGED}")
    return trial


def _load_csv(file: Location) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(file.read_text()))
    except (OSError, ValueError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise UserError(f"{redact_uri(file.uri)}: not a readable CSV table ({exc}); {DAMAGED}") from None
    if "trial" not in frame.columns:
        raise UserError(f"{redact_uri(file.uri)}: no 'trial' column, which the report needs; {DAMAGED}")
    return frame


def table8_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    serve = data["serve"]

    def method_of(summary: dict) -> str:
        return method_label(summary["method"], summary.get("strategy", {}))

    lines = (("base model, not tuned", None, serve.get("base")),
             (f"{method_of(data['lora'])}, best sweep trial", data["lora"], serve.get("lora-best")),
             (method_of(data["full"]), data["full"], serve.get("full")))
    for label, summary, served in lines:
        rate = f"{served['tokens_per_second']:.1f}" if served else "-"
        if summary is None:
            rows.append([label, "-", served.get("device", "-") if served else "-", "-", "-", "-", "-", "-", "-",
                         "-", rate])
            continue
        rows.append([
            label, summary["server_type"], summary["device"], str(summary["num_workers"]),
            str(summary["per_device_batch_size"]), str(summary["gradient_accumulation_steps"]),
            f"{summary['tuning_seconds']:.1f}", f"{summary['tokens_per_second']:,.0f}",
            f"{summary['peak_memory_bytes'] / 2**30:.2f}", f"{summary['final_eval_loss']:.4f}", rate,
        ])
    return rows


def sweep_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    frame = data["sweep"]
    columns = [c for c in frame.columns if c in ("trial", "status", "final_eval_loss", "tokens_per_second", "steps")
               or "." in c]
    rows = []
    for record in frame[columns].to_dict("records"):
        rows.append([_cell(record[c], "{:,.0f}" if c == "tokens_per_second" else "{:.4f}") for c in columns])
    return columns, rows


def _cell(value: Any, fmt: str = "{:.4f}") -> str:
    if isinstance(value, float):
        return "-" if value != value else fmt.format(value)  # NaN: no value
    return str(value)


def eval_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    outcome = data["eval"]
    names = list(outcome["scores"])
    columns = ["family", "in tuning", "examples", *[f"{n}: token F1 (EM)" for n in names]]
    rows = family_rows(outcome)
    effects = [[e["name"], e["claim"], f"{e['model']} vs {e['baseline']}",
                _cell(e["scores"]["token_f1"]), _cell(e["baseline_scores"]["token_f1"]),
                _cell(e["scores"]["rouge_l"]), _cell(e["baseline_scores"]["rouge_l"]),
                "yes" if e["shows"] else "no"] for e in outcome["effects"]]
    return columns, rows, effects


EFFECT_COLUMNS = ["effect", "claim", "comparison", "token F1", "baseline token F1", "ROUGE-L", "baseline ROUGE-L",
                  "shows here?"]


def _survey_plans(data: dict[str, Any]) -> list[Plan]:
    return [Plan(**item) for item in data["plan"]["survey_table"]]


def sections(data: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, text, columns, rows) for every table, shared by both renderings."""
    stats, this_run = data["stats"], data["plan"]["this_run"]
    stages = data["stages"]["seconds"]
    sweep_columns, sweep_table = sweep_rows(data)
    eval_columns, eval_table, effects = eval_rows(data)
    outcome = data["eval"]
    return [
        ("Table 8, reproduced for this run",
         f"Data: {stats['records']:,} records ({stats['train_records']:,} train), mean {stats['mean_length']:.0f} "
         f"tokens, {stats['truncated']:,} truncated at the max length. Tuning time excludes worker start-up; "
         "inference is the median batch-1 rate through Ray Serve's POST /v1/latency.",
         TABLE8_COLUMNS, table8_rows(data)),
        ("The planner for this run",
         f"{this_run['reason']}. Estimated {this_run['est_hours'] * 3600:,.0f} s of tuning at the assumed "
         f"{this_run['sustained_tflops_per_gpu']} TFLOP/s per {this_run['server_type']} GPU.",
         ["quantity", "value"],
         [["GPUs", str(this_run["num_gpus"])], ["per-device batch", str(this_run["per_device_batch_size"])],
          ["memory / GPU (GiB)", str(this_run["memory_gib"].get("total"))],
          ["training tokens", f"{this_run['train_tokens']:,.0f}"]]),
        ("Planner: LLaMA 7B-65B beside the survey",
         "Alpaca-52K, 3 epochs, 512 tokens, stated throughput assumptions (docs/planner.md).",
         SURVEY_COLUMNS, survey_rows(_survey_plans(data))),
        ("Sweep (Ray Tune)", f"Best trial: {data['best']['trial']} (eval loss {data['best']['final_eval_loss']:.4f}).",
         sweep_columns, sweep_table),
        ("Evaluation per task family",
         f"{outcome['examples_per_family']} held-out examples per family, greedy decoding; families "
         f"{', '.join(outcome['held_out_families'])} were held out of all tuning.", eval_columns, eval_table),
        ("The three effects of instruction tuning",
         "Measured, not quoted: 'no' means the effect did not show on this model and data.", EFFECT_COLUMNS, effects),
        ("Stage times", "Wall seconds per stage of `raytune-it run`.", ["stage", "seconds"],
         [[name, f"{seconds:.1f}"] for name, seconds in stages.items()]),
    ]


def render_markdown(data: dict[str, Any]) -> str:
    parts = ["# raytune-it run report\n"]
    for title, text, columns, rows in sections(data):
        parts.append(f"## {title}\n\n{text}\n\n{markdown_table(columns, rows)}")
        if title.startswith("Sweep"):
            parts.append("\n".join(f"![{name}](sweep/{name})" for name in data["plots"]) + "\n")
    return "\n".join(parts)


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: dict[str, Any]) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:first-child{text-align:left}img{max-width:48%;margin:4px}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>raytune-it run report</title>"
             f"<style>{style}</style></head><body><h1>raytune-it run report</h1>"]
    for title, text, columns, rows in sections(data):
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{_html_table(columns, rows)}")
        if title.startswith("Sweep"):
            for name in data["plots"]:
                encoded = base64.b64encode((data["run_dir"] / "sweep" / name).read_bytes()).decode()
                parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(run_dir: "str | Location") -> tuple[Location, Location]:
    """Render both files from the run folder's files, local or in storage, into the same folder."""
    run_dir = as_location(run_dir, "RUN_DIR")
    data = collect(run_dir)
    try:
        texts = render_markdown(data), render_html(data)
    except (TypeError, ValueError, IndexError, AttributeError) as exc:  # a value of the wrong kind in a file
        raise UserError(f"{redact_uri(run_dir.uri)}: a file of the run holds a value the report cannot use "
                        f"({type(exc).__name__}: {exc}); {DAMAGED}") from None
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    markdown.write_text(texts[0])
    page.write_text(texts[1])
    return markdown, page
