"""`ray job submit` of a tiny job against a real `ray start --head` on 127.0.0.1, token auth on."""

import os
import secrets
import signal
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]


@pytest.fixture
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
        yield ray_bin, address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_train_and_logs_the_summary(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    job_id = f"raytune-it-test-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(ray_bin), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
         "--working-dir", str(ROOT), "--", "python", "-m", "raytune_it", "train", "tiny-lora",
         f"run.storage={tmp_path / 'runs'}", "train.max_steps=4", "train.eval_every_steps=2"],
        env=env, capture_output=True, text=True, timeout=300)
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
