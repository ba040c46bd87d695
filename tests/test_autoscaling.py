"""The two server types on Ray's fake multi-node autoscaler, with runs in a real S3-compatible bucket.

The head carries no server-type resource and both worker node types start at 0 nodes, so every node a job
lands on was added by the autoscaler for that job. ``a800-80g`` may have no node at all (max 0): a job for it
shows the bounded failure.
"""

import io
import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from fake_cluster import FakeAutoscalingCluster
from helpers import latest_checkpoint_step, raw_metrics
from raytune_it.hardware import SERVER_TYPES
from raytune_it.storage import open_location

pytestmark = pytest.mark.integration
RTX = SERVER_TYPES["rtx3090-24g"].resource


@pytest.fixture(scope="module")
def cluster():
    fake = FakeAutoscalingCluster({"a800-80g": 0, "rtx3090-24g": 2})
    try:
        fake.wait_until_up()
        yield fake
    finally:
        fake.stop()


def _nodes(cluster, alive: bool = True) -> list[dict]:
    """The cluster's nodes as Ray lists them (with ``alive=False`` also those gone), from a fresh driver."""
    code = "import json, ray; ray.init(log_to_driver=False); print('NODES', json.dumps(ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env=cluster.client_env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    [line] = [line for line in out.splitlines() if line.startswith("NODES ")]
    return [n for n in json.loads(line[len("NODES "):]) if n["Alive"] or not alive]


def _train(cluster, storage, cwd, *overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raytune_it", "train", "tiny-lora", f"run.storage={storage}",
         "scaling.server_type=rtx3090-24g", "scaling.num_workers=2", "scaling.placement_timeout_s=180",
         *overrides], env=cluster.client_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_nodes_of_the_type_come_up_for_a_job_a_lost_node_is_replaced_and_idle_nodes_go(cluster, s3_storage,
                                                                                         empty_cwd):
    [head] = _nodes(cluster)
    assert RTX not in head["Resources"], "the head offers no server type: any node of one was autoscaled"
    run = open_location(s3_storage) / "tiny-lora"
    job = _train(cluster, s3_storage, empty_cwd, "train.max_steps=60", "train.eval_every_steps=5")
    try:
        deadline = time.monotonic() + 400
        while (latest_checkpoint_step(run) or 0) < 10:
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint at step 10 in the bucket"
            time.sleep(0.5)
        killed_after = latest_checkpoint_step(run)
        workers = [child for raylet in cluster.raylets() for child in raylet.children()
                   if "RayTrainWorker" in " ".join(child.cmdline())]
        assert len(workers) == 2
        raylet = workers[0].parent()
        lost_node = next(n["NodeID"] for n in _nodes(cluster) if RTX in n["Resources"])
        raylet.kill()  # the whole node goes: its raylet, and with it the workers and their object store
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["restarts"] >= 1
    assert lost_node not in summary["worker_nodes"] and head["NodeID"] not in summary["worker_nodes"], \
        "the run finished on a node the autoscaler brought up after the loss"
    history = raw_metrics(run)
    resumed = [m for m in history if m["restarts"] >= 1]
    assert resumed[0]["step"] >= killed_after + 1 > 10, "it continued from the checkpoint in the bucket"
    assert resumed[0]["loss"] < history[0]["loss"] - 0.3
    assert sorted({m["step"] for m in history}) == list(range(1, 61)), "no step is missing from metrics.jsonl"
    # Idle nodes are released (idle_timeout_minutes of the fake cluster: 6 s).
    deadline = time.monotonic() + 180
    while any(RTX in n["Resources"] for n in _nodes(cluster)):
        assert time.monotonic() < deadline, "the idle nodes were not released"
        time.sleep(3)


def test_a_type_the_autoscaler_cannot_provide_fails_after_the_timeout(cluster, s3_storage, empty_cwd):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "raytune_it", "train", "tiny-lora", f"run.storage={s3_storage}",
         "scaling.server_type=a800-80g", "scaling.placement_timeout_s=5"], env=cluster.client_env, cwd=empty_cwd,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "scaling.server_type=a800-80g: the cluster offers 0 of resource 'server_type:a800-80g'" in result.stderr
    assert "an autoscaler was asked for them" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 150


def test_a_sweep_scales_out_onto_the_type_it_asked_for(cluster, s3_storage, empty_cwd):
    """Two concurrent trials of two workers each need two nodes; none is up when the sweep starts."""
    [head] = _nodes(cluster)
    result = subprocess.run(
        [sys.executable, "-m", "raytune_it", "sweep", "tiny-sweep", f"run.storage={s3_storage}",
         "scaling.server_type=rtx3090-24g", "scaling.num_workers=2", "scaling.placement_timeout_s=180",
         "train.max_steps=4", "train.eval_every_steps=2", 'tune.search_space={"lora.rank": [4, 8]}',
         "tune.scheduler=none", "tune.max_concurrent_trials=2"],
        env=cluster.client_env, cwd=empty_cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = open_location(s3_storage) / "tiny-sweep"
    results = pd.read_csv(io.StringIO((sweep / "results.csv").read_text()))
    assert list(results["status"]) == ["finished", "finished"], results.to_string()
    assert (sweep / "best" / "_PUBLISHED.json").is_file()
    # Nodes released as idle (after 6 s) may already be listed without their resources: read those of nodes
    # Ray still describes, and rely on the cluster's shape for the rest (the head has no server type and
    # rtx3090-24g is the only type the autoscaler may add).
    resources = {n["NodeID"]: n["Resources"] for n in _nodes(cluster, alive=False)}
    nodes = [json.loads((sweep / "trials" / f"trial-{i:03d}" / "summary.json").read_text())["worker_nodes"]
             for i in results["trial"]]
    assert all(len(set(n)) == 1 for n in nodes), "each trial's two workers share one node"
    assert nodes[0][0] != nodes[1][0], "the two trials ran at once, on two nodes the autoscaler added"
    assert all(n[0] != head["NodeID"] for n in nodes), "both on autoscaled nodes, not the head"
    assert all(RTX in resources[n[0]] for n in nodes if resources.get(n[0])), "both on nodes of the type asked for"
