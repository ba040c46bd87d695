"""Experiment tracking against a real MLflow server on 127.0.0.1 and W&B in offline mode.

Each test reads what was logged back through the tracker's own client (MLflow) or its run file (W&B)
and compares it with what the run folder says: the config, every step's loss, the summary, the export.
"""

import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, raw_metrics, stop_process_group, wandb_offline_records
from raytune_it.config import load_config
from raytune_it.config.loading import flatten
from raytune_it.errors import ConfigError, UserError

NO_TRACKERS = "the trackers extra is not installed (pip install -c constraints.txt -e '.[test,trackers]')"


def _mlflow_client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --- settings and what is logged: no Ray, no server -----------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("tracking.uri=http://alice:s3cret@127.0.0.1:5000", "credentials in the URI"),
    ("tracking.uri=https://mlflow.example/?token=abc", "MLFLOW_TRACKING_TOKEN"),
    ("tracking.experiment=team/llm", "tracking.experiment"),
    ("tracking.backend=comet", "'none', 'mlflow' or 'wandb'"),
])
def test_bad_tracking_settings_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle) as caught:
        load_config("tiny-lora", [override])
    assert "s3cret" not in str(caught.value) and "abc" not in str(caught.value), "the error shows no secret"


def test_params_are_the_config_without_its_secrets():
    from raytune_it.tracking.record import run_params, step_metrics

    config = load_config("tiny-lora", ["serve.api_key=do-not-log-me", "lora.rank=8"])
    params = run_params(config)
    assert params["lora.rank"] == 8 and params["method"] == "lora"
    assert params["serve.api_key"] is None and "do-not-log-me" not in json.dumps(params)
    assert step_metrics({"step": 3, "total_steps": 9, "loss": 2.5, "eval_loss": float("nan"), "node": "abc",
                         "flag": True}) == {"loss": 2.5}


def test_secrets_on_the_command_line_are_redacted_once_parsed(monkeypatch, capsys):
    from raytune_it.cli import main, redacted_argv

    # What the CLI leaves in sys.argv for libraries that record it (W&B) once it has parsed the command line.
    monkeypatch.setattr(sys, "argv", ["raytune-it", "config", "show", "tiny-lora", "serve.api_key=k0"])
    assert main() == 0
    assert sys.argv[-1] == "serve.api_key=<redacted>" and "k0" not in capsys.readouterr().out

    assert redacted_argv(["raytune-it", "serve", "x", "serve.api_key=k1", "lora.rank=4"]) == [
        "raytune-it", "serve", "x", "serve.api_key=<redacted>", "lora.rank=4"]
    assert redacted_argv(["raytune-it", "bench", "serve", "--api-key", "k2", "--api-key=k3"]) == [
        "raytune-it", "bench", "serve", "--api-key", "<redacted>", "--api-key=<redacted>"]


def test_nothing_is_tracked_by_default(tmp_path):
    from rich.console import Console

    from raytune_it.storage import as_location
    from raytune_it.tracking import start_run

    run = start_run(load_config("tiny-lora"), as_location(tmp_path), console=Console(file=io.StringIO()), kind="train")
    run.log_steps([{"step": 1, "loss": 1.0}])
    run.log_outcome({"steps": 1})
    run.end("finished")
    assert not run.enabled and not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_named_with_the_extra_to_install(backend, tmp_path, monkeypatch):
    from rich.console import Console

    from raytune_it.storage import as_location
    from raytune_it.tracking import start_run

    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: importing it raises ImportError
    config = load_config("tiny-lora", [f"tracking.backend={backend}"])
    needs = rf"tracking.backend={backend} needs the {backend} package.*raytune-it\[trackers\]"
    with pytest.raises(UserError, match=needs):
        start_run(config, as_location(tmp_path), console=Console(file=io.StringIO()), kind="train")
    assert not any(tmp_path.iterdir())


class _FlakyServer:
    """A tracker backend whose server is down for its first ``down`` calls (the guard is under test here)."""

    label, run_id, address = "Flaky", "r1", "flaky://r1"

    def __init__(self, down):
        self.down, self.steps, self.ended = down, {}, None

    def _call(self):
        if self.down:
            self.down -= 1
            raise ConnectionError("connection refused")

    def log_steps(self, steps):
        self._call()
        self.steps.update(steps)

    def log_outcome(self, metrics, tags, files, step):
        self._call()

    def end(self, status):
        self._call()
        self.ended = status


def test_a_tracker_that_goes_away_warns_once_and_gets_the_steps_later():
    from rich.console import Console

    from raytune_it.tracking import TrackedRun

    out = io.StringIO()
    server = _FlakyServer(down=2)
    run = TrackedRun(server, Console(file=out, width=400))
    run.log_steps([{"step": 1, "loss": 3.0}])
    run.log_steps([{"step": 2, "loss": 2.0, "eval_loss": 2.5}])
    assert server.steps == {}
    run.log_steps([{"step": 3, "loss": 1.0}])
    assert server.steps == {1: {"loss": 3.0}, 2: {"loss": 2.0, "eval_loss": 2.5}, 3: {"loss": 1.0}}
    run.end("finished")
    assert server.ended == "finished"
    assert out.getvalue().count("warning: Flaky did not take the run's metrics (connection refused)") == 1


def test_an_unreachable_tracking_server_stops_the_job_before_ray(tmp_path):
    import ray

    from raytune_it.train.driver import train

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "tracking.backend=mlflow", f"tracking.uri={address}"])
    with pytest.raises(UserError, match=rf"could not start a run at tracking.uri={address}.*tracking.backend=none"):
        train(config)
    assert not ray.is_initialized() and not (tmp_path / "tiny-lora" / "checkpoints").exists()
    assert not (tmp_path / "tiny-lora" / "tracking.json").exists()


# --- real runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free 127.0.0.1 port, its store and artifacts in a temporary folder."""
    pytest.importorskip("mlflow", reason=NO_TRACKERS)
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        stop_process_group(server)


def _short_run(tmp_path, *extra):
    return load_config("tiny-lora", [f"run.storage={tmp_path}", "scaling.num_workers=1", "train.max_steps=4",
                                     "train.eval_every_steps=2", "train.lr_schedule=constant", *extra])


def _history(client, run_id, key):
    """A metric's logged values by step."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.integration
def test_a_run_and_its_resume_log_to_one_mlflow_run(local_ray, mlflow_server, tmp_path):
    from raytune_it.tracking.mlflow_backend import param_text
    from raytune_it.train.driver import train

    overrides = ["tracking.backend=mlflow", f"tracking.uri={mlflow_server}", "tracking.experiment=tracking-test"]
    config = _short_run(tmp_path, *overrides)
    train(config)
    run_dir = tmp_path / "tiny-lora"
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    client = _mlflow_client(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-lora"
    assert client.get_experiment(run.info.experiment_id).name == "tracking-test"
    assert run.data.params == {key: param_text(value) for key, value in flatten(config.to_dict()).items()}
    steps = raw_metrics(run_dir)
    assert _history(client, run_id, "loss") == pytest.approx({m["step"]: m["loss"] for m in steps})
    assert sorted(_history(client, run_id, "eval_loss")) == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary.final_train_loss"] == pytest.approx(summary["final_train_loss"])
    assert run.data.metrics["summary.tokens_per_second"] == pytest.approx(summary["tokens_per_second"])
    assert run.data.tags["raytune_it.export"] == str(run_dir / "export") == summary["export_dir"]
    logged = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    assert json.loads(logged.read_text()) == summary

    # Running the same name again resumes the run from its checkpoint, and its tracked run with it.
    train(_short_run(tmp_path, *overrides, "train.max_steps=6"))
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["summary.steps"] == 6
    assert sorted(_history(client, run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.integration
def test_a_sweep_logs_its_trials_under_its_own_mlflow_run(local_ray, mlflow_server, tmp_path):
    import pandas as pd

    from raytune_it.tune.sweep import sweep

    # One trial at a time: the good learning rate first, then one that barely moves, which ASHA stops at step 2.
    outcome = sweep(load_config("tiny-sweep", [
        f"run.storage={tmp_path}", "train.max_steps=6", "train.eval_every_steps=2", "tune.grace_period_steps=2",
        'tune.search_space={"train.learning_rate": [3e-3, 1e-7]}', "tune.max_concurrent_trials=1",
        "tracking.backend=mlflow", f"tracking.uri={mlflow_server}", "tracking.experiment=sweep-test"]))
    assert [row["status"] for row in outcome.rows] == ["finished", "stopped early"]
    client = _mlflow_client(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["raytune_it.kind"] == "sweep"]
    trials = sorted((r for r in runs if r.data.tags["raytune_it.kind"] == "trial"), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in trials] == ["tiny-sweep/trial-000", "tiny-sweep/trial-001"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert [float(r.data.params["train.learning_rate"]) for r in trials] == [3e-3, 1e-7]
    folder = Path(outcome.folder.path)
    for index, trial in enumerate(trials):
        trial_steps = raw_metrics(folder / "trials" / f"trial-00{index}")
        assert _history(client, trial.info.run_id, "loss") == pytest.approx(
            {m["step"]: m["loss"] for m in trial_steps})
    # The stopped trial's process was ended by Tune; the sweep ends its run, saying why.
    assert [r.info.status for r in trials] == ["FINISHED", "KILLED"]
    assert trials[1].data.tags["raytune_it.stopped"] == outcome.rows[1]["reason"]
    results = Path(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path / "dl")))
    assert results.read_text() == (folder / "results.csv").read_text()
    table = pd.read_csv(folder / "results.csv")
    assert parent.data.metrics["best.final_eval_loss"] == pytest.approx(table["final_eval_loss"][0])
    assert parent.data.metrics["sweep.trials_finished"] == 1 and parent.data.metrics["sweep.trials_stopped_early"] == 1
    assert parent.data.tags["raytune_it.best_export"] == str(folder / "best") and parent.info.status == "FINISHED"


@pytest.mark.integration
def test_a_run_logs_to_wandb_offline_beside_its_folder(local_ray, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason=NO_TRACKERS)
    from raytune_it.train.driver import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = _short_run(tmp_path, "tracking.backend=wandb", "tracking.experiment=wandb-test",
                        "serve.api_key=do-not-log-me")
    train(config)
    run_dir = tmp_path / "tiny-lora"
    saved = json.loads((run_dir / "tracking.json").read_text())
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{saved['run_id']}")
    # wandb's core process finishes writing the file just after run.finish() returns: wait for its last record.
    deadline = time.monotonic() + 60
    while not (records := wandb_offline_records(offline))["exit"] and time.monotonic() < deadline:
        time.sleep(0.2)
    config_values = {k: v for update in records["config"] for k, v in update.items()}
    assert config_values["lora.rank"] == 16 and config_values["train.max_steps"] == 4
    assert config_values["raytune_it.export"] == str(run_dir / "export")
    assert "do-not-log-me" not in offline.joinpath(f"run-{saved['run_id']}.wandb").read_text(errors="replace")
    logged = {h["step"]: h["loss"] for h in records["history"] if "loss" in h}
    assert logged == pytest.approx({m["step"]: m["loss"] for m in raw_metrics(run_dir)})
    summary = json.loads((run_dir / "summary.json").read_text())
    final = {k: v for update in records["summary"] for k, v in update.items()}
    assert final["summary.final_eval_loss"] == pytest.approx(summary["final_eval_loss"])
    assert records["exit"] == [0]
