"""What the fine-tuning service costs over running ``raytune-it train`` by hand: the time from
``client.fine_tuning.jobs.create`` to the fine-tuned model's first streamed token, against the wall time of
the same training run started by hand on the same cluster, then its adapter's first token, in one run.

    python bench/service_overhead.py [--steps 4] [--repeats 4] [--records 40] [--keep]

Both sides run on one ``ray start --head`` on 127.0.0.1 (token auth on) with the app
``raytune-it serve tiny-lora serve.fine_tuning=true`` attached to it, started before any timing. The hand
run is ``python -m raytune_it train`` with the very config the service builds for the job (read back from
the job's ``config.yaml``, under another run name), followed by a chat request for that run's adapter
through the same app; the service's figure is an SDK client's: ``jobs.create``, ``retrieve`` every 0.5 s,
then a streamed chat request for ``fine_tuned_model`` until its first token. The difference is what the
service adds: the Ray Job's start, the reconcile that notices the end, the result file and the adapter's
first load. Each side's first repeat warms caches (the tiny model, imports), so the median of the later
repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import free_port, stop_process_group  # noqa: E402


def conversations(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for i in range(count):
            a, b = i % 17 + 1, i % 11 + 2
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                  {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return path


def wait(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)
    return value


def first_token_seconds(client, model: str, started: float) -> float:
    stream = client.chat.completions.create(model=model, max_tokens=4, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            elapsed = time.monotonic() - started
            stream.close()
            return elapsed
    raise SystemExit(f"{model} streamed no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="train.max_steps of each run")
    parser.add_argument("--repeats", type=int, default=4, help="runs per side; the first of each warms up")
    parser.add_argument("--records", type=int, default=40, help="conversations in the training file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (Ray's and the app's logs)")
    args = parser.parse_args()

    import httpx
    import openai

    work = Path(tempfile.mkdtemp(prefix="rti-bench-", dir="/tmp"))  # Ray's socket paths must stay short
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, port = free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
         "--disable-usage-stats", "--temp-dir", str(work / "ray")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    storage = work / "runs"
    storage.mkdir()
    app = None
    try:
        wait("the Ray head", lambda: subprocess.run(
            [str(bin_dir / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=env,
            capture_output=True).returncode == 0, 120, 1)
        app_log = (work / "serve.log").open("w")
        app = subprocess.Popen(
            [sys.executable, "-m", "raytune_it", "serve", "tiny-lora", "serve.fine_tuning=true",
             f"run.storage={storage}", f"serve.port={port}", "serve.model_name=tiny-llama",
             f"serve.adapter_root={storage}"],
            env=env, cwd=ROOT, stdout=app_log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            if app.poll() is not None:
                raise SystemExit("raytune-it serve exited:\n" + (work / "serve.log").read_text()[-3000:])
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait("raytune-it serve", healthy, 300, 1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        upload = client.files.create(file=conversations(work / "train.jsonl", args.records).open("rb"),
                                     purpose="fine-tune")
        overrides = {"train.max_steps": args.steps, "train.eval_every_steps": args.steps, "scaling.num_workers": 1}
        service, by_hand = [], []
        for repeat in range(args.repeats):
            started = time.monotonic()
            job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id,
                                                 extra_body={"raytune_it": overrides})
            done = wait("the job", lambda job=job: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed", "cancelled") and j, 600)
            if done.status != "succeeded":
                raise SystemExit(f"the job {done.status}: {done.error}")
            service.append(first_token_seconds(client, done.fine_tuned_model, started))

            config = storage / "fine_tuning" / "jobs" / job.id / "config.yaml"
            name = f"by-hand-{repeat}"
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "raytune_it", "train", str(config), f"run.name={name}",
                            f"run.storage={storage}"], env=env, cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            by_hand.append(first_token_seconds(client, f"{name}", started))
            print(f"repeat {repeat + 1}: service {service[-1]:.1f} s, by hand {by_hand[-1]:.1f} s", flush=True)
        kept = slice(1, None) if args.repeats > 1 else slice(None)
        ours, theirs = statistics.median(service[kept]), statistics.median(by_hand[kept])
        print(f"\njobs.create -> first token of the ft model: {ours:.1f} s")
        print(f"raytune-it train by hand -> first token of its adapter: {theirs:.1f} s")
        print(f"the service's overhead: {ours - theirs:+.1f} s ({ours / theirs:.2f}x); "
              f"median of {len(service[kept])} repeat(s) after a warm-up, {args.steps} steps each")
    finally:
        if app is not None:
            stop_process_group(app, timeout=120)
        stop_process_group(head, timeout=60)
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
