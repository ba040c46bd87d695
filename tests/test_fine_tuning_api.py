"""The fine-tuning service end to end, driven by the openai SDK unchanged: `raytune-it serve` attached to a
real `ray start --head` on 127.0.0.1 (token auth on), storage in moto's S3. Each job is a Ray Job of
`raytune-it train`, as `ray job submit` would start it, so this module also covers jobs on a cluster."""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import s3_uri
from helpers import free_port, stop_process_group

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]
SHORT_JOB = {"train.max_steps": 4, "train.eval_every_steps": 2, "scaling.num_workers": 1, "data.eval_fraction": 0.2}


@pytest.fixture(scope="module")
def ray_head():
    """A head started with --block in its own process group, so that teardown stops this head only."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # jobs run this venv's python
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # Ray's Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    temp_dir = tempfile.mkdtemp(prefix="rti-", dir="/tmp")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
         "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield ray_bin, address, dict(env, RAYTUNE_IT_TEST_GCS=f"127.0.0.1:{gcs}")
    finally:
        # An idle head takes about 30 s to stop on SIGTERM (its processes' grace periods); the jobs are over and
        # the temp dir goes with it, so the group is killed after a short grace.
        stop_process_group(head, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


class App:
    """`raytune-it serve` with the fine-tuning API, stopped with Ctrl-C and started again on the same
    storage. The default organization's key is given only by environment, to the serve process alone (not
    to the cluster), so the replicas must enforce a key they never saw in their own environment."""

    def __init__(self, env: dict, storage: str, keys_file: Path) -> None:
        self.default_key, self.port = secrets.token_hex(16), free_port()
        self.env = dict(env, RAY_ADDRESS=env["RAYTUNE_IT_TEST_GCS"], RAYTUNE_IT_API_KEY=self.default_key)
        self.args = [sys.executable, "-m", "raytune_it", "serve", "tiny-lora", "serve.fine_tuning=true",
                     f"run.storage={storage}", f"serve.port={self.port}", "serve.model_name=tiny-llama",
                     f"serve.api_keys_file={keys_file}", "serve.max_file_bytes=20000"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "raytune-it serve did not come up"
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process, signal.SIGINT, timeout=120)  # Ctrl-C: the app goes, the cluster stays

    def client(self, key: str):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def app(ray_head, s3_endpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    acme_key = secrets.token_hex(16)
    keys_file = folder / "keys.yaml"  # acme's key is stored only as its digest
    keys_file.write_text(f"acme: ['sha256:{hashlib.sha256(acme_key.encode()).hexdigest()}']\n")
    served = App(ray_head[2], s3_uri(s3_endpoint, f"service-{uuid.uuid4().hex[:8]}"), keys_file)
    served.acme_key = acme_key  # type: ignore[attr-defined]
    served.start()
    try:
        yield served
    finally:
        served.stop()


def conversations(path: Path, count: int = 40) -> Path:
    with path.open("w") as handle:
        for i in range(count):
            a, b = i % 17 + 1, i % 11 + 2
            handle.write(json.dumps({"messages": [
                {"role": "developer", "content": "You add numbers."},
                {"role": "user", "content": [{"type": "text", "text": f"What is {a} plus {b}?"}]},
                {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return path


def error_of(call):
    import openai

    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.response.json()["error"]


def test_what_a_client_gets_wrong_is_refused_by_name(app, tmp_path):
    import openai

    client = app.client(app.default_key)
    with pytest.raises(openai.AuthenticationError):
        app.client("wrong-key").files.list()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                 "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    status, body = error_of(lambda: client.files.create(file=bad.open("rb"), purpose="fine-tune"))
    assert status == 400 and body["message"].startswith("bad.jsonl:2:") and "assistant" in body["message"]
    deep = tmp_path / "deep.json"  # a JSON array whose second record nests 9,000 levels (under the size limit)
    deep.write_text("[" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                        "content": "yo"}]})
                    + "," + "[" * 9_000 + "]" * 9_000 + "]")
    status, body = error_of(lambda: client.files.create(file=deep.open("rb"), purpose="fine-tune"))
    assert status == 400 and body["message"].startswith("deep.json: record 2:") and "nest deeper" in body["message"]
    import httpx

    headers = {"Authorization": f"Bearer {app.default_key}"}
    for params in ({"limit": "ten"}, {"order": "sideways"}):  # FastAPI's own 422, answered as OpenAI's 400
        listed = httpx.get(f"{app.url}/v1/files", params=params, headers=headers)
        assert (listed.status_code, listed.json()["error"]["param"]) == (400, *params), listed.text
    torn = httpx.post(f"{app.url}/v1/files", content=b"not a form",
                      headers={**headers, "content-type": "multipart/form-data; boundary=xyz"})
    assert torn.status_code == 400 and "not valid multipart" in torn.json()["error"]["message"], torn.text
    csv = tmp_path / "train.csv"
    csv.write_text("instruction,output\nhi,yo\n")
    status, body = error_of(lambda: client.files.create(file=csv.open("rb"), purpose="fine-tune"))
    assert status == 400 and body["message"].startswith("train.csv: the name must end in .json, .jsonl"), body
    big = conversations(tmp_path / "big.jsonl", count=400)  # over serve.max_file_bytes
    status, body = error_of(lambda: client.files.create(file=big.open("rb"), purpose="fine-tune"))
    assert status == 413 and body["code"] == "file_too_large"
    assert not client.files.list().data  # neither reached storage

    good = client.files.create(file=conversations(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    for key, value in {"run.storage": "/tmp/elsewhere", "model.trust_remote_code": True, "serve.port": 1,
                       "data.path": "/etc/passwd", "tracking.backend": "mlflow"}.items():
        status, body = error_of(lambda key=key, value=value: client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=good.id, extra_body={"raytune_it": {key: value}}))
        assert (status, body["code"], body["param"]) == (400, "forbidden_override", f"raytune_it.{key}"), body
    status, body = error_of(lambda: client.fine_tuning.jobs.create(  # train's preflight, at creation
        model="tiny-llama", training_file=good.id, extra_body={"raytune_it": {"lora.rank": 10**9}}))
    assert (status, body["code"]) == (400, "invalid_hyperparameters") and "lora.rank=1000000000" in body["message"]
    status, body = error_of(lambda: client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=good.id, hyperparameters={"n_epochs": "three"}))
    assert (status, body["param"]) == (400, "hyperparameters.n_epochs") and "'auto' or" in body["message"], body
    status, body = error_of(lambda: client.fine_tuning.jobs.create(model="gpt-4o", training_file=good.id))
    assert status == 404 and body["param"] == "model"
    assert not client.fine_tuning.jobs.list().data  # nothing was started


def wait_for(what, check, timeout: float = 300, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_upload_tune_chat_pause_resume_restart_and_cancel_and_another_organization_sees_nothing(app, ray_head,
                                                                                               tmp_path):
    import openai

    ray_bin, address, env = ray_head
    client = app.client(app.default_key)
    upload = client.files.create(file=conversations(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    short = client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id, suffix="adder",
                                           extra_body={"raytune_it": SHORT_JOB})
    assert short.status == "running" and short.hyperparameters.n_epochs == 3  # "auto": the survey's 3 epochs
    assert short.estimated_finish is None or short.estimated_finish >= short.created_at
    long = client.fine_tuning.jobs.create(  # 28 steps an epoch, 50 epochs: it is cancelled long before its end
        model="tiny-llama", training_file=upload.id, hyperparameters={"n_epochs": 50, "batch_size": 1},
        extra_body={"raytune_it": {**SHORT_JOB, "train.max_steps": None}})
    assert long.status == "queued"  # serve.max_running_jobs is 1: it waits for the first, in order

    done = wait_for("the short job", lambda: (job := client.fine_tuning.jobs.retrieve(short.id)).status
                    in ("succeeded", "failed", "cancelled") and job)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-llama:default:adder:{short.id}" and done.trained_tokens > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(short.id, limit=100).data[::-1]]
    for expected in ("Created fine-tuning job", "Validated training file", "Job queued", "Fine-tuning job started",
                     "Step 4/4: training loss=", "Checkpoint saved at step 4", "successfully completed"):
        assert any(expected in m for m in messages), (expected, messages)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(short.id).data
    assert [c.step_number for c in checkpoints] == [4, 2] and checkpoints[0].metrics.train_loss > 0
    metrics = client.files.content(done.result_files[0]).text.splitlines()
    assert metrics[0].startswith("step,train_loss,valid_loss") and len(metrics) == 5
    # The job ran as a Ray Job of raytune-it train: its log has the run's summary; token auth stays on.
    logs = subprocess.run([str(ray_bin), "job", "logs", "--address", address, f"{short.id}-1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert "summary (the survey's Table 8 columns)" in logs.stdout, logs.stderr[-2000:]
    refused = subprocess.run([str(ray_bin), "job", "status", "--address", address, f"{short.id}-1"],
                             env=dict(env, RAY_AUTH_TOKEN="0" * 64), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    def chat(api, model):
        return api.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 plus 3?"}])

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    assert chat(client, done.fine_tuned_model).usage.completion_tokens > 0

    # Another organization sees none of it: every such request is a 404, as for what does not exist.
    acme = app.client(app.acme_key)
    assert not acme.fine_tuning.jobs.list().data and not acme.files.list().data
    assert done.fine_tuned_model not in [m.id for m in acme.models.list().data]
    for call in (lambda: acme.files.retrieve(upload.id), lambda: acme.files.content(done.result_files[0]),
                 lambda: acme.files.delete(upload.id), lambda: acme.fine_tuning.jobs.retrieve(short.id),
                 lambda: acme.fine_tuning.jobs.list_events(short.id), lambda: acme.fine_tuning.jobs.cancel(long.id),
                 lambda: acme.fine_tuning.jobs.checkpoints.list(short.id),
                 lambda: chat(acme, done.fine_tuned_model),
                 lambda: chat(acme, done.fine_tuned_model.replace(":default:", ":acme:")),
                 lambda: acme.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id)):
        assert error_of(call)[0] == 404

    # The queued job started when the first ended. Paused, its Ray Job stops; resumed, a second attempt
    # carries on from its last checkpoint; cancelled (by the restarted app), that attempt stops too.
    def ray_job_says(submission):
        result = subprocess.run([str(ray_bin), "job", "status", "--address", address, submission], env=env,
                                capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    wait_for("the long job's first checkpoint", lambda: client.fine_tuning.jobs.checkpoints.list(long.id).data)
    assert client.fine_tuning.jobs.pause(long.id).status == "paused"
    wait_for("its first attempt to stop", lambda: "was stopped" in ray_job_says(f"{long.id}-1"), timeout=120)
    kept = client.fine_tuning.jobs.checkpoints.list(long.id).data[0].step_number
    assert client.fine_tuning.jobs.resume(long.id).status == "running"

    # The app stopped and started again (the job's second attempt runs on meanwhile) keeps every file, job and
    # model: it still serves the first job's model, and follows and cancels the second.
    app.stop()
    app.start()
    client = app.client(app.default_key)
    assert client.files.retrieve(upload.id).bytes == upload.bytes
    assert client.fine_tuning.jobs.retrieve(short.id).fine_tuned_model == done.fine_tuned_model
    assert chat(client, done.fine_tuned_model).usage.completion_tokens > 0

    def second_attempts_log():
        return subprocess.run([str(ray_bin), "job", "logs", "--address", address, f"{long.id}-2"], env=env,
                              capture_output=True, text=True, timeout=60).stdout

    # Its first eval step is printed: the one after the checkpoint, and never step 2 of a run begun anew.
    log = wait_for("the second attempt's first eval step", lambda: (
        text := second_attempts_log()) and f"step {kept + 2}/" in text and text)
    assert "step 2/" not in log, log[-2000:]
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    wait_for("the second attempt to stop", lambda: "was stopped" in ray_job_says(f"{long.id}-2"), timeout=120)
    assert {j.id: j.status for j in client.fine_tuning.jobs.list().data} == {short.id: "succeeded",
                                                                            long.id: "cancelled"}
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 24)
