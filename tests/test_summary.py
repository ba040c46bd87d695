"""One run summary: a finished run's summary.json and a stopped sweep trial's row come from the same
computation (``train.summary.measured``), and a step without eval (NaN) never counts as one."""

import json
import math

from raytune_it.config import load_config
from raytune_it.storage import as_location
from raytune_it.train.step_metrics import NO_EVAL, step_eval_loss
from raytune_it.train.summary import build_summary
from raytune_it.tune.results import ROW_NUMBERS, _trial_metrics

HISTORY = [
    {"step": 1, "loss": 3.0, "eval_loss": NO_EVAL, "tokens": 100, "train_seconds": 2.0, "eval_seconds": 0.0,
     "checkpoint_seconds": 0.0, "peak_memory_bytes": 10},
    {"step": 2, "loss": 2.5, "eval_loss": 2.75, "tokens": 220, "train_seconds": 4.0, "eval_seconds": 1.0,
     "checkpoint_seconds": 0.5, "peak_memory_bytes": 30},
    {"step": 3, "loss": 2.0, "eval_loss": NO_EVAL, "tokens": 330, "train_seconds": 5.5, "eval_seconds": 1.0,
     "checkpoint_seconds": 0.5, "peak_memory_bytes": 20},
]


def test_a_step_without_eval_has_no_eval_loss():
    assert step_eval_loss({"eval_loss": NO_EVAL}) is None and step_eval_loss({}) is None
    assert step_eval_loss({"eval_loss": 0.0}) == 0.0 and math.isnan(NO_EVAL)


def test_a_stopped_trial_and_a_finished_one_report_the_same_numbers_from_the_same_steps(tmp_path):
    summary = build_summary(load_config("tiny-lora"), HISTORY, steps_per_epoch=10, wall_seconds=60.0,
                            export_dir="x")
    assert (summary.final_eval_loss, summary.tuning_seconds, summary.tokens_per_second) == (2.75, 7.0, 60.0)
    assert summary.peak_memory_bytes == 30 and summary.initial_train_loss == 3.0
    stopped, finished = as_location(tmp_path / "stopped"), as_location(tmp_path / "finished")
    for folder in (stopped, finished):
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in HISTORY))
    summary.write(finished)
    from_steps, from_summary = _trial_metrics(stopped), _trial_metrics(finished)
    assert set(from_steps) == set(ROW_NUMBERS) and from_steps == from_summary
