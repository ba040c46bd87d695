"""`ray job submit` of a tiny job against a real `ray start --head` on 127.0.0.1, token auth on."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import free_port, stop_process_group

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head started with --block in its own process group, so that teardown stops this head only."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # the job runs this venv's python
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
        stop_process_group(head, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_train_and_logs_the_summary(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    job_id = f"raytune-it-test-{secrets.token_hex(4)}"
    # The dashboard answers before its job agent has registered (Ray answers 500 "No available agent to
    # submit job" then, more often on a loaded machine): submit again for a bounded while.
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
             "--working-dir", str(ROOT), "--", "python", "-m", "raytune_it", "train", "tiny-lora",
             f"run.storage={tmp_path / 'runs'}", "train.max_steps=4", "train.eval_every_steps=2"],
            env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stderr[-2000:]
    deadline, status = time.monotonic() + 600, ""
    while time.monotonic() < deadline:
        status = subprocess.run([str(ray_bin), "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True, timeout=60).stdout + ""
        if any(word in status for word in ("SUCCEEDED", "succeeded", "FAILED", "failed", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([str(ray_bin), "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "succeeded" in status.lower(), status + logs[-3000:]
    assert "summary (the survey's Table 8 columns)" in logs and "tokens / s" in logs
    assert (tmp_path / "runs" / "tiny-lora" / "summary.json").is_file()
    # authentication stays on: a wrong token is refused
    bad = subprocess.run([str(ray_bin), "job", "status", "--address", address, job_id],
                         env=dict(env, RAY_AUTH_TOKEN="0" * 64), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "token" in (bad.stdout + bad.stderr).lower()


def test_serve_attached_to_a_cluster_enforces_a_key_given_only_by_environment(ray_head):
    """RAYTUNE_IT_API_KEY set for `raytune-it serve` alone (not on the cluster): replicas still require it."""
    import httpx

    ray_bin, _, env = ray_head
    port, key = free_port(), secrets.token_hex(16)
    serve_env = dict(env, RAY_ADDRESS=env["RAYTUNE_IT_TEST_GCS"], RAYTUNE_IT_API_KEY=key)
    server = subprocess.Popen([sys.executable, "-m", "raytune_it", "serve", "tiny-lora", f"serve.port={port}",
                               "serve.model_name=tiny-llama"], env=serve_env, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "raytune-it serve did not come up"
            time.sleep(2)
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        authorized = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                                headers={"Authorization": f"Bearer {key}"})
        assert authorized.status_code == 200, authorized.text
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the app shuts down and the cluster stays
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
