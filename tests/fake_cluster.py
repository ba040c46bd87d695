"""Ray's fake multi-node autoscaler on this machine: a head with no server type and worker node types that
the autoscaler launches as real raylets on demand (``fake_multinode`` provider).

Ray 2.60's ``ray.cluster_utils.AutoscalingCluster`` cannot be used: the wheel lacks the example YAML it reads,
and its ``start()`` runs ``ray stop --force``, which would kill every Ray on the machine. This helper writes
its own config from ``raytune_it.hardware`` and stops only the processes it started (those under its own
temp dir).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from helpers import free_port
from raytune_it.hardware import autoscaler_node_resources

#: Logical CPUs of each fake worker node: two Ray Train workers of one CPU each fit one node.
NODE_CPUS = 2
HEAD_NODE_TYPE = "ray.head.default"


def autoscaler_config(max_nodes: dict[str, int], gcs_address: str, idle_timeout_minutes: float) -> dict:
    types = {HEAD_NODE_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    for name, most in max_nodes.items():
        resources = dict(autoscaler_node_resources(name, NODE_CPUS), object_store_memory=256 * 2**20)
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": most}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
             "cluster_synced_files")
    return {
        "cluster_name": "raytune-it-fake", "max_workers": sum(max_nodes.values()), "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": HEAD_NODE_TYPE, "auth": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{key: [] for key in empty},
    }


class FakeAutoscalingCluster:
    def __init__(self, max_nodes: dict[str, int], idle_timeout_minutes: float = 0.1) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        # Ray's Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
        self.temp_dir = tempfile.mkdtemp(prefix="rti-as-", dir="/tmp")
        config = Path(self.temp_dir) / "autoscaler.json"
        config.write_text(json.dumps(autoscaler_config(max_nodes, self.address, idle_timeout_minutes)))
        bin_dir = Path(sys.executable).parent
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        self.head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
             str(port), "--num-cpus", "1", "--object-store-memory", str(256 * 2**20),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()), "--disable-usage-stats",
             "--temp-dir", self.temp_dir, f"--autoscaling-config={config}"],
            env=dict(self.env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                     AUTOSCALER_HEARTBEAT_TIMEOUT_S="10"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.client_env = dict(self.env, RAY_ADDRESS=self.address)

    def wait_until_up(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.status().returncode != 0:
            assert self.head.poll() is None and time.monotonic() < deadline, "the fake cluster's head did not start"
            time.sleep(1)

    def status(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", self.address],
                              env=self.env, capture_output=True, text=True, timeout=60)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the head's and the nodes the autoscaler started."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in process.info["cmdline"] or []):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def raylets(self) -> list[psutil.Process]:
        """One raylet per node; a node's workers are its raylet's children."""
        return [p for p in self.processes() if "raylet/raylet" in " ".join(p.cmdline())]

    def stop(self) -> None:
        started = self.processes()
        started += [child for process in started for child in process.children(recursive=True)]
        try:
            os.killpg(self.head.pid, signal.SIGTERM)
            self.head.wait(timeout=5)  # a graceful stop takes about 30 s: what is left is killed below
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
