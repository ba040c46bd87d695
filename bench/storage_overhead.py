"""What remote run storage costs: the same tiny LoRA job with a local run folder and in an S3 bucket.

Starts moto's S3-compatible server on 127.0.0.1 (the ``test`` extra), then runs
``raytune-it train tiny-lora`` with ``run.storage`` on the local disk and in the
bucket, alternating, ``--rounds`` times each, every run a fresh name (tokenizing,
checkpoints every ``--eval-every`` steps, export). Prints the median wall time and
tuning time of each and the bucket's ratio to the local disk. A local S3 server
measures the cost of going through the S3 protocol (multipart uploads, listing,
the export's publish and the driver's metrics rewrites), not a network's latency.

    python bench/storage_overhead.py [--rounds 3] [--steps 24] [--eval-every 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(env: dict) -> tuple[subprocess.Popen, str]:
    from pyarrow.fs import S3FileSystem

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    filesystem = S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            filesystem.create_dir("bench")
            return server, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def run(storage: str, args: argparse.Namespace, env: dict) -> dict:
    from raytune_it.storage import open_location

    name = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raytune_it", "train", "tiny-lora", f"run.storage={storage}",
                    f"run.name={name}", f"train.max_steps={args.steps}", f"train.eval_every_steps={args.eval_every}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    summary = json.loads((open_location(storage) / name / "summary.json").read_text())
    return {"wall": wall, "tuning": summary["tuning_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each storage, alternating")
    parser.add_argument("--steps", type=int, default=24, help="training steps per run")
    parser.add_argument("--eval-every", type=int, default=6, help="steps between eval + checkpoint")
    args = parser.parse_args()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")})
    folder = tempfile.mkdtemp(prefix="raytune-it-storage-bench-")
    server, endpoint = start_moto(env)
    storages = {"local disk": folder, "s3 (moto)": f"s3://bench/runs?endpoint_override={endpoint}&scheme=http"}
    results: dict[str, list[dict]] = {label: [] for label in storages}
    try:
        for round_index in range(args.rounds):
            for label, storage in storages.items():
                results[label].append(run(storage, args, env))
                print(f"round {round_index + 1} {label}: wall {results[label][-1]['wall']:.1f} s, "
                      f"tuning {results[label][-1]['tuning']:.1f} s", flush=True)
    finally:
        server.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    medians = {label: {key: statistics.median(r[key] for r in rows) for key in ("wall", "tuning")}
               for label, rows in results.items()}
    base = medians["local disk"]
    print(f"\n{args.steps} steps, eval + checkpoint every {args.eval_every}; median of {args.rounds} round(s)")
    print(f"{'storage':<12}{'wall (s)':>10}{'tuning (s)':>12}{'wall x':>8}{'tuning x':>10}")
    for label, median in medians.items():
        print(f"{label:<12}{median['wall']:>10.1f}{median['tuning']:>12.1f}{median['wall'] / base['wall']:>8.2f}"
              f"{median['tuning'] / base['tuning']:>10.2f}")


if __name__ == "__main__":
    main()
