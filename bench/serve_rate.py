"""Batch-1 generation rate through the HTTP endpoint against in-process ``model.generate``.

Same model (the tiny LLaMA), same prompt, same number of new tokens, greedy, one
request at a time, measured in one run:

    python bench/serve_rate.py [--max-tokens 64] [--repeats 5]

It prints tokens/s for each (new tokens over wall time, prompt included, as a
client sees it) and the ratio HTTP / in-process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPT = "### Instruction:\nConvert 12 kilometers to meters.\n\n### Response:\n"


def in_process(max_tokens: int, repeats: int) -> float:
    import torch

    from raytune_it.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama").eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    rates = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            elapsed = time.perf_counter() - started
            rates.append((out.shape[1] - inputs["input_ids"].shape[1]) / elapsed)
    return statistics.median(rates[1:])  # the first run warms up


def over_http(max_tokens: int, repeats: int) -> tuple[float, float]:
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
    try:
        url = start(config)
        rates, engine_rates = [], []
        with httpx.Client(timeout=300) as client:
            for _ in range(repeats + 1):
                started = time.perf_counter()
                body = client.post(f"{url}/v1/completions", json={
                    "model": "tiny-llama", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).json()
                elapsed = time.perf_counter() - started
                rates.append(body["usage"]["completion_tokens"] / elapsed)
                engine_rates.append(body["usage"]["tokens_per_second"])
        serve.shutdown()
    finally:
        ray.shutdown()
    return statistics.median(rates[1:]), statistics.median(engine_rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests (after one warm-up)")
    args = parser.parse_args()
    local = in_process(args.max_tokens, args.repeats)
    http, engine = over_http(args.max_tokens, args.repeats)
    print(f"\nbatch size 1, {args.max_tokens} new tokens, greedy, tiny-llama on CPU")
    print(f"{'in-process model.generate':<34}{local:>10,.1f} tokens/s")
    print(f"{'HTTP /v1/completions (client)':<34}{http:>10,.1f} tokens/s")
    print(f"{'engine-reported decode rate':<34}{engine:>10,.1f} tokens/s")
    print(f"ratio HTTP / in-process: {http / local:.2f}")


if __name__ == "__main__":
    main()
