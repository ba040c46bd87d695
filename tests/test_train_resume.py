"""An interrupted `raytune-it train` re-run with the same name continues where it stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import latest_checkpoint_step, raw_metrics

pytestmark = pytest.mark.integration


def _train(storage, *extra):
    return [sys.executable, "-m", "raytune_it", "train", "tiny-lora", f"run.storage={storage}",
            "train.max_steps=48", "train.eval_every_steps=6", "scaling.num_workers=1", *extra]


def test_interrupted_run_resumes_step_data_position_and_optimizer(tmp_path):
    run_dir = tmp_path / "tiny-lora"
    first = subprocess.Popen(_train(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while (latest_checkpoint_step(run_dir) or 0) < 12:
            assert time.monotonic() < deadline and first.poll() is None, "no checkpoint at step 12"
            time.sleep(0.2)
        resume_from = latest_checkpoint_step(run_dir)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: Ray Train aborts the run
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # Ctrl-C says so, says how to resume, and exits as an interrupted program does.
    assert first.returncode == 130, first.returncode
    assert "training interrupted. Run the same command again (run.name=tiny-lora" in " ".join(out.split())
    interrupted = raw_metrics(run_dir)
    assert interrupted[-1]["step"] < 48, "the first run was stopped before the end"
    resume_from = max(resume_from, latest_checkpoint_step(run_dir))

    second = subprocess.run(_train(tmp_path), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "summary (the survey's Table 8 columns)" in second.stdout
    history = raw_metrics(run_dir)
    resumed = history[len(interrupted):]
    assert resumed[0]["step"] == resume_from + 1 > 1, "it continued from the checkpoint, not from step 1"
    assert resumed[-1]["step"] == 48 and all(m["restarts"] == 1 for m in resumed)
    # The adapter, optimizer, data position and dropout RNG continue: every step both runs took has the same
    # loss, to the bit, and the re-run is not back at the start.
    before = {m["step"]: m["loss"] for m in interrupted}
    overlap = [m for m in resumed if m["step"] in before]
    assert overlap and overlap[0]["step"] == resumed[0]["step"]
    assert [m["loss"] for m in overlap] == [before[m["step"]] for m in overlap]
    assert resumed[0]["loss"] < interrupted[0]["loss"] - 0.3
