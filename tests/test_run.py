"""`raytune-it run` end to end with every stage cut small, and `raytune-it report` rebuilding its report.

The run lives in a real S3-compatible bucket (moto on 127.0.0.1), so this one run also shows every stage
writing to and reading from remote storage: the sweep and its best/, ZeRO-3 with 2 workers, serving an adapter
and a full model given as s3:// URIs, eval, and the report rebuilt from the bucket. Nothing lands on the local
disk (the run's working directory stays empty).
"""

import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from helpers import ListenerWatch, beyond_loopback
from raytune_it.storage import open_location
from raytune_it.train.summary import method_label

pytestmark = pytest.mark.integration

# One sweep trial: the stage's files, best/ and report are what this test reads; sweeps of several trials
# (grids, ASHA, a resume from a bucket) are tests/test_sweep.py's.
MINIMAL = ["data.builtin_records=300", "train.max_steps=4", "train.eval_every_steps=2",
           'tune.search_space={"lora.rank": [8]}', "eval.train_steps=4", "eval.examples_per_family=1",
           "eval.max_new_tokens=4", "e2e.latency_max_tokens=4", "e2e.latency_repeats=1",
           "e2e.full_overrides=[method=full, scaling.num_workers=2, train.micro_batch_size=2]"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, s3_endpoint):
    from conftest import s3_uri

    storage = s3_uri(s3_endpoint, "e2e")
    cwd = tmp_path_factory.mktemp("cwd")
    process = subprocess.Popen([sys.executable, "-m", "raytune_it", "run", "tiny-run", f"run.storage={storage}",
                                *MINIMAL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    with ListenerWatch(process.pid) as watch:  # every server of every stage: Ray, Tune, Train, Serve
        stdout, stderr = process.communicate(timeout=1200)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert not list(cwd.iterdir()), "a run in s3:// storage wrote nothing to the local disk"
    return open_location(storage) / "tiny-run", stdout, watch


def test_every_server_of_every_stage_listens_on_loopback_only(finished_run):
    """Ray's processes, Tune's trials, Ray Train's workers and their rendezvous store, Serve's proxy and
    replicas: each listening socket `raytune-it run` opened on its local Ray was on 127.0.0.1."""
    _, _, watch = finished_run
    names = {name for name, _, _ in watch.seen}
    assert watch.samples > 20 and any("RayTrainWorker" in n for n in names) and any("ServeReplica" in n for n in names)
    assert not beyond_loopback(sorted(watch.seen)), f"listening beyond loopback: {beyond_loopback(sorted(watch.seen))}"


def test_run_completes_and_every_stage_leaves_its_files(finished_run):
    run_dir, stdout, _ = finished_run
    for name in ("stats.json", "plan.json", "sweep/results.csv", "sweep/best/adapter_model.safetensors",
                 "sweep/best/_PUBLISHED.json", "full/export/model.safetensors", "full/export/_PUBLISHED.json",
                 "full/checkpoints/checkpoint_manager_snapshot.json", "serve.json", "eval/eval.json",
                 "stages.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    assert "report:" in stdout and "report.md" in stdout
    served = json.loads((run_dir / "serve.json").read_text())
    assert served["lora-best"]["adapter"].startswith("s3://") and served["full"]["base"].startswith("s3://")
    assert json.loads((run_dir / "eval/eval.json").read_text())["models"]["full"].startswith("s3://")
    stages = json.loads((run_dir / "stages.json").read_text())["seconds"]
    assert list(stages) == ["stats and plan", "sweep", "full tuning", "serve", "eval"]


def test_report_numbers_come_from_the_runs_own_files(finished_run):
    run_dir, _, _ = finished_run
    report = (run_dir / "report.md").read_text()
    for title in ("Table 8, reproduced for this run", "The planner for this run",
                  "Planner: LLaMA 7B-65B beside the survey", "Sweep (Ray Tune)", "Evaluation per task family",
                  "The three effects of instruction tuning", "Stage times"):
        assert f"## {title}" in report, title
    best = json.loads((run_dir / "sweep/best/best.json").read_text())
    lora = json.loads((run_dir / f"sweep/trials/trial-{best['trial']:03d}/summary.json").read_text())
    full = json.loads((run_dir / "full/summary.json").read_text())
    served = json.loads((run_dir / "serve.json").read_text())
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert lora["method"] == "lora" and full["method"] == "full", "summary.json keeps the config's value"
    lora_row = lines[f"{method_label('lora', lora['strategy'])}, best sweep trial"]
    full_row = lines["full (ZeRO-3)"]
    assert f"| {lora['tokens_per_second']:,.0f} |" in lora_row and f"| {lora['tuning_seconds']:.1f} |" in lora_row
    assert f"| {served['lora-best']['tokens_per_second']:.1f} |" in lora_row
    assert f"| {full['tokens_per_second']:,.0f} |" in full_row and f"| {full['num_workers']} |" in full_row
    assert f"| {served['full']['tokens_per_second']:.1f} |" in full_row
    assert "| 7B | full | a800-80g | 2 | 8 | 3.0 | 2 / 8 / 3.0 |" in report
    trials = pd.read_csv(io.StringIO((run_dir / "sweep/results.csv").read_text()))
    sweep_section = report.split("## Sweep (Ray Tune)")[1].split("## ")[0]
    assert sum(line.startswith("| ") for line in sweep_section.splitlines()) == 1 + len(trials)
    effects = json.loads((run_dir / "eval/eval.json").read_text())["effects"]
    effects_section = report.split("## The three effects")[1]
    for effect in effects:
        assert effect["name"] in effects_section
        assert f"{effect['scores']['token_f1']:.4f}" in effects_section
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()  # self-contained plots


def test_report_command_regenerates_an_identical_report_from_the_bucket(finished_run, tmp_path):
    run_dir, _, _ = finished_run
    before = {name: (run_dir / name).read_bytes() for name in ("report.md", "report.html")}
    (run_dir / "report.md").delete()
    result = subprocess.run([sys.executable, "-m", "raytune_it", "report", run_dir.uri], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not list(tmp_path.iterdir())
    missing = subprocess.run([sys.executable, "-m", "raytune_it", "report", (run_dir / "sweep").uri],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "not a finished 'raytune-it run' folder" in missing.stderr


def test_a_damaged_run_file_is_named_not_a_traceback(finished_run, tmp_path):
    """A report rebuilt from a folder whose files were edited, truncated or half-copied names the file and
    what it lacks, and writes nothing."""
    import pytest

    from raytune_it.endtoend.report import write_report
    from raytune_it.errors import UserError

    run_dir, _, _ = finished_run
    for name in run_dir.files():
        if name.endswith((".json", ".csv", ".png")):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    cases = [("serve.json", "{", "serve.json: not valid JSON"),
             ("eval/eval.json", "[]", "eval/eval.json: holds an array, not a JSON object"),
             ("stats.json", '{"a": 1}', "stats.json: no 'records'; the run folder was changed"),
             ("plan.json", '{"this_run": null}', "a file of the run holds a value the report cannot use"),
             ("sweep/results.csv", "x,y\n1,2\n", "results.csv: no 'trial' column"),
             ("sweep/best/best.json", '{"trial": 99}', "trial-099/summary.json: missing")]
    for name, damage, message in cases:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_text(damage)
        with pytest.raises(UserError, match=re.escape(message)) as caught:
            write_report(str(tmp_path))
        assert "run 'raytune-it run' again" in str(caught.value) and not (tmp_path / "report.md").exists()
        (tmp_path / name).write_bytes(original)
    write_report(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == (run_dir / "report.md").read_text()


def test_a_rerun_that_changes_a_stage_is_refused_before_any_stage_runs(finished_run):
    """A re-run of the name resumes every stage: one whose job changed (here the full-tuning stage's batch) is
    named before Ray starts, not after the sweep has been resumed and the stats redone."""
    from rich.console import Console

    from raytune_it.config import load_config
    from raytune_it.endtoend.stages import run_all
    from raytune_it.errors import ConfigError

    run_dir, _, _ = finished_run
    storage = run_dir.uri.replace("/tiny-run", "", 1)
    changed = [*MINIMAL[:-1], "e2e.full_overrides=[method=full, scaling.num_workers=2, train.micro_batch_size=1]"]
    stages_before = (run_dir / "stages.json").read_text()
    with pytest.raises(ConfigError, match=r"run 'full' already exists .* \(train.micro_batch_size: 2 -> 1\)"):
        run_all(load_config("tiny-run", [f"run.storage={storage}", *changed]), console=Console(file=io.StringIO()))
    assert (run_dir / "stages.json").read_text() == stages_before
