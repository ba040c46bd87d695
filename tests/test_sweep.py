"""Ray Tune sweeps on a real local Ray: a 2x2 grid, ASHA early stopping, bad spaces, resume."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from raytune_it.config import load_config
from raytune_it.errors import ConfigError
from raytune_it.tune.space import expand_trials
from raytune_it.tune.sweep import mark_infeasible, sweep

# --- search space validation: no Ray needed, every error before any trial ------------------------

@pytest.mark.parametrize(
    "space,needle",
    [
        ({"lora.rnak": [4, 8]}, "'lora.rnak' is not a config path; keys in lora: rank"),
        ({"nothing.here": [1]}, "'nothing.here' is not a config path; keys in the top level"),
        ({"lora.rank": []}, "tune.search_space.lora.rank: the list of values is empty"),
        ({"lora.rank": [4, 0]}, "trial 1 (lora.rank=0) is not a valid config"),
        ({"train.micro_batch_size": ["big"]}, "train.micro_batch_size: got 'big'"),
        ({"lora": [1]}, "'lora' is a section"),
        ({"run.name": ["a", "b"]}, "'run.name' cannot be swept"),
        ({"train.learning_rate": {"lognormal": [1, 2]}}, "unknown distribution 'lognormal'"),
        ({"train.learning_rate": {"loguniform": [0, 1e-3]}}, "loguniform bounds must be > 0"),
        # a swept path is checked as load_config checks the base's, not read by a traceback in preflight
        ({"model.name_or_path": ["tiny-llama", "/etc"]},
         "trial 1 (model.name_or_path=/etc) is not a valid config: model.name_or_path: '/etc' is not a Hugging"),
        ({"data.path": ["/no/such.jsonl"]}, "trial 0 (data.path=/no/such.jsonl) is not a valid config: data.path"),
    ],
)
def test_bad_search_space_fails_naming_the_key(space, needle):
    config = load_config("tiny-sweep", [f"tune.search_space={json.dumps(space)}"])
    with pytest.raises(ConfigError) as err:
        expand_trials(config)
    assert needle in str(err.value)


def test_empty_space_and_continuous_grid_are_rejected():
    with pytest.raises(ConfigError, match="tune.search_space is empty"):
        expand_trials(load_config("tiny-lora"))
    config = load_config("tiny-sweep", ['tune.search_space={"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}'])
    with pytest.raises(ConfigError, match="continuous distributions need tune.search=random"):
        expand_trials(config)


def test_grid_and_random_trials_are_validated_configs():
    grid = expand_trials(load_config("tiny-sweep"))
    assert [(t.config.lora.rank, t.config.train.micro_batch_size) for t in grid] == [(4, 2), (4, 4), (16, 2), (16, 4)]
    assert all(t.config.tune.search_space == {} for t in grid)
    random_space = load_config("tiny-sweep", [
        'tune.search_space={"train.learning_rate": {"loguniform": [1e-5, 1e-3]}, "lora.rank": [4, 8]}',
        "tune.search=random", "tune.num_samples=5", "tune.seed=3"])
    drawn = expand_trials(random_space)
    assert len(drawn) == 5 and all(1e-5 <= t.config.train.learning_rate <= 1e-3 for t in drawn)
    assert [t.params for t in drawn] == [t.params for t in expand_trials(random_space)], "seeded"


def test_combinations_that_cannot_fit_are_skipped_with_the_reason():
    config = load_config("tiny-sweep", ['tune.search_space={"train.micro_batch_size": [1, 4096]}',
                                        "tune.memory_budget_gib=3"])
    trials = expand_trials(config)
    mark_infeasible(trials, 3 * 2**30)
    assert trials[0].skipped_reason is None
    assert "more than the 3.0 GiB budget" in trials[1].skipped_reason and "activations" in trials[1].skipped_reason


# --- real sweeps ---------------------------------------------------------------------------

def test_a_sweep_rerun_with_another_search_is_refused_before_ray(tmp_path):
    """A re-run resumes: with another search space, trial 1 would be other values and the results table would
    label the old trials' losses with the new values."""
    from raytune_it.config.loading import save_config, with_overrides
    from raytune_it.train.driver import check_resume_compatible, run_dir_of

    first = load_config("tiny-sweep", [f"run.storage={tmp_path}"])
    save_config(first, run_dir_of(first))
    changed = with_overrides(first, ['tune.search_space={"lora.rank": [2, 32]}'])
    with pytest.raises(ConfigError, match="sweep 'tiny-sweep' already exists .* with a different config "
                                          r"\(tune.search_space"):
        sweep(changed, console=Console(file=io.StringIO()))
    # how many trials run at once is not what a trial is: that may change on a resume
    check_resume_compatible(with_overrides(first, ["tune.max_concurrent_trials=1"]), run_dir_of(first), sweep=True)


@pytest.mark.integration
def test_two_by_two_sweep_writes_results_plots_and_best(local_ray, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # train.max_steps=8 is shorter than the preset's eval interval (10): the trials evaluate every 2 steps.
    config = load_config("tiny-sweep", [f"run.storage={tmp_path}", "train.max_steps=8", "tune.scheduler=none"])
    outcome = sweep(config)
    folder = Path(outcome.folder.path)
    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"finished"}
    assert sorted(zip(table["lora.rank"], table["train.micro_batch_size"])) == [(4, 2), (4, 4), (16, 2), (16, 4)]
    assert (table["steps"] == 8).all() and (table["tokens_per_second"] > 0).all()
    metrics = [json.loads(line) for line in (folder / "trials/trial-000/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4, 6, 8]
    assert pd.read_parquet(folder / "results.parquet").shape == table.shape
    # one tokenized dataset in the storage, prepared before the trials and trained on by all four
    [prepared] = list(tmp_path.rglob("prepared.json"))
    key = prepared.parent.name
    assert prepared.parent.parent == tmp_path / "_prepared"
    assert {json.loads((folder / f"trials/trial-00{i}/summary.json").read_text())["dataset"] for i in range(4)} == {key}
    for plot in ("eval_loss_vs_rank.png", "throughput_vs_batch_size.png"):
        assert (folder / plot).stat().st_size > 1000
    best = table.loc[table["final_eval_loss"].idxmin()]
    best_dir = folder / "best"
    assert json.loads((best_dir / "best.json").read_text())["trial"] == best["trial"]
    assert json.loads((best_dir / "adapter_config.json").read_text())["r"] == best["lora.rank"]
    assert "micro_batch_size: %d" % best["train.micro_batch_size"] in (best_dir / "config.yaml").read_text()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), best_dir)


def test_a_short_sweep_fits_eval_and_asha_to_its_steps_and_refuses_a_longer_grace_period(tmp_path):
    """``raytune-it sweep tiny-sweep train.max_steps=8`` once died in Ray with ASHA's assertion (its grace period
    defaulted to train.eval_every_steps, 10 in the preset, past the end of the trials)."""
    from ray.tune.schedulers import ASHAScheduler

    from raytune_it.tune.sweep import fit_short_trials, grace_period

    config = load_config("tiny-sweep", [f"run.storage={tmp_path}", "train.max_steps=8"])
    trials = expand_trials(config)
    fit_short_trials(config, trials, Console(file=io.StringIO()))
    assert {t.config.train.eval_every_steps for t in trials} == {2}
    assert grace_period(config, trials) == 2
    ASHAScheduler(time_attr="step", max_t=9, grace_period=grace_period(config, trials))  # what Ray refused before
    too_long = load_config("tiny-sweep", [f"run.storage={tmp_path}", "train.max_steps=8", "tune.grace_period_steps=20"])
    with pytest.raises(ConfigError, match=r"tune.grace_period_steps: got 20.*at most 8"):
        fit_short_trials(too_long, expand_trials(too_long), Console(file=io.StringIO()))
    with pytest.raises(ConfigError, match=r"tune.grace_period_steps"):
        sweep(too_long)  # before Ray starts


@pytest.mark.integration
def test_asha_stops_weak_trials_early(local_ray, tmp_path):
    # a good learning rate first, then one that barely moves: ASHA stops it at its first rung
    config = load_config("tiny-sweep", [
        f"run.storage={tmp_path}", 'tune.search_space={"train.learning_rate": [3e-3, 1e-7]}',
        "train.max_steps=24", "train.eval_every_steps=4", "tune.grace_period_steps=4", "tune.reduction_factor=2",
        "tune.max_concurrent_trials=1", "train.micro_batch_size=4"])
    outcome = sweep(config)
    rows = {r["trial"]: r for r in outcome.rows}
    assert rows[0]["status"] == "finished" and rows[0]["steps"] == 24
    stopped = [r for r in outcome.rows if r["status"] == "stopped early"]
    assert stopped, outcome.rows
    assert all(r["steps"] < 24 and "ASHA stopped it" in r["reason"] for r in stopped)
    table = pd.read_csv(Path(outcome.folder.path) / "results.csv")
    assert (table["status"] == "stopped early").sum() == len(stopped)


@pytest.mark.integration
def test_interrupted_sweep_resumes_from_the_bucket(s3_storage, empty_cwd):
    """Tune's state, the trials and the results all live in s3:// storage: the re-run restores Tune from there."""
    from raytune_it.storage import open_location

    command = [sys.executable, "-m", "raytune_it", "sweep", "tiny-sweep", f"run.storage={s3_storage}",
               "train.max_steps=8", "train.eval_every_steps=4", "tune.scheduler=none", "tune.max_concurrent_trials=1",
               'tune.search_space={"lora.rank": [4, 8]}']
    folder = open_location(s3_storage) / "tiny-sweep"
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not (folder / "trials" / "trial-000" / "summary.json").is_file():
            assert time.monotonic() < deadline and first.poll() is None, "the first trial did not finish"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (folder / "results.csv").exists(), "the first sweep was interrupted before it finished"
    trial0_metrics = (folder / "trials" / "trial-000" / "metrics.jsonl").read_text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the interrupted sweep" in second.stdout
    table = pd.read_csv(io.StringIO((folder / "results.csv").read_text()))
    assert len(table) == 2 and set(table["status"]) == {"finished"}
    # the finished trial was not trained again
    assert (folder / "trials" / "trial-000" / "metrics.jsonl").read_text() == trial0_metrics
