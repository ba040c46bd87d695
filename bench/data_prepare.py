"""Tokenizing a dataset: the single-process driver path against the Ray Data pipeline on 1 and 2 CPUs, and
the driver's peak memory as the dataset grows, in one run.

    python bench/data_prepare.py [--records 400000] [--small 100000] [--rounds 3] [--real FILE]

Each figure is a fresh Python process (``--one``), so that its peak RSS (``ru_maxrss``) is that path's alone:
it builds the ``tiny-lora`` config on the data file with ``data.preparation=driver`` or ``ray_data`` (the
pipeline on a local Ray of that many CPUs, one actor per CPU) and times ``prepare`` into an empty prepared
root: reading, checking, templating, tokenizing, masking, the content-hash split and the Parquet shards. The
Ray path's time includes its actors' start (the tokenizer loaded once per actor), not Ray's own start.
The records are the built-in generated tasks (``--real`` adds a line for a real Alpaca-format file).
Rounds run every path once each, interleaved, so that a slow spell of a shared machine hits them all; each
figure is the median of its rounds.

The driver path is one process but not one core: the fast tokenizer encodes each batch of records on Rust
threads across the machine's cores, while the actors run one thread each (one CPU per actor). So the bench
also times the driver path with ``TOKENIZERS_PARALLELISM=false`` (``single-1thread``): the ratio of the two
is how many cores' worth the driver path already used, and bounds what the pipeline can gain on this many
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(path: str, mode: str, cpus: int, root: str) -> None:
    from raytune_it.config import load_config
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.prepared import prepare

    overrides = [f"data.path={path}", f"data.prepared_root={root}", f"data.preparation={mode}"]
    if mode == "ray_data":
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        overrides.append(f"data.preparation_actors={cpus}")
    config = load_config("tiny-lora", overrides)
    tokenizer = load_tokenizer(config.model.name_or_path)
    start = time.perf_counter()
    prepared, _ = prepare(config, tokenizer)
    seconds = time.perf_counter() - start
    print(json.dumps({"records": prepared.records, "seconds": seconds,
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(path: Path, mode: str, cpus: int, scratch: Path, tokenizer_threads: bool = True) -> dict:
    root = tempfile.mkdtemp(dir=scratch)
    env = dict(os.environ) if tokenizer_threads else dict(os.environ, TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--one", str(path), mode, str(cpus), root],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400_000, help="generated records for the speed figures")
    parser.add_argument("--small", type=int, default=100_000, help="the smaller set for the driver RSS ratio")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--real", type=Path, help="a real Alpaca-format file, timed on both paths as well")
    parser.add_argument("--one", nargs=4, metavar=("FILE", "MODE", "CPUS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, mode, cpus, root = args.one
        one(path, mode, int(cpus), root)
        return

    from raytune_it.data.synthetic import generate, write_jsonl

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        big = write_jsonl(generate(args.records, seed=0), scratch / "big.jsonl")
        small = write_jsonl(generate(args.small, seed=0), scratch / "small.jsonl")
        paths = {"single": lambda: measure(big, "driver", 1, scratch),
                 "single-1thread": lambda: measure(big, "driver", 1, scratch, tokenizer_threads=False),
                 "ray-data-1cpu": lambda: measure(big, "ray_data", 1, scratch),
                 "ray-data-2cpu": lambda: measure(big, "ray_data", 2, scratch)}
        rounds: dict[str, list[dict]] = {name: [] for name in paths}
        for index in range(args.rounds):
            for name, run in paths.items():
                rounds[name].append(run())
                print(f"round {index + 1}/{args.rounds} {name}: {rounds[name][-1]['seconds']:.1f} s", flush=True)
        runs = {name: {key: statistics.median(run[key] for run in items) for key in ("records", "seconds", "rss_mib")}
                for name, items in rounds.items()}
        small_driver = measure(small, "driver", 1, scratch)
        for name, run in runs.items():
            print(f"{name:>14}: {run['records']:,} records in {run['seconds']:.1f} s, "
                  f"{run['records'] / run['seconds']:,.0f} records/s, peak RSS {run['rss_mib']:.0f} MiB")
        if args.real:
            for mode, cpus in (("driver", 1), ("ray_data", 2)):
                run = measure(args.real, mode, cpus, scratch)
                print(f"{'real ' + mode:>14}: {run['records']:,} records, {run['records'] / run['seconds']:,.0f}/s")
        single = runs["single"]["seconds"]
        print(f"driver peak RSS {args.records:,} / {args.small:,} records: "
              f"{runs['single']['rss_mib'] / small_driver['rss_mib']:.2f}x "
              f"({runs['single']['rss_mib']:.0f} / {small_driver['rss_mib']:.0f} MiB)")
        print(f"single/single-1thread: {runs['single-1thread']['seconds'] / single:.2f}x "
              "(the cores' worth the driver path's tokenizer threads already use)")
        one_thread = runs["single-1thread"]["seconds"]
        print(f"ray-data-2cpu/single-1thread: {one_thread / runs['ray-data-2cpu']['seconds']:.2f}x")
        print(f"ray-data-1cpu/single: {single / runs['ray-data-1cpu']['seconds']:.2f}x")
        print(f"ray-data-2cpu/single: {single / runs['ray-data-2cpu']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
