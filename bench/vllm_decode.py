"""Batch-1 decode rate of the vLLM engine against the bound of reading every weight once per token.

At batch size 1 each new token reads all the weights from GPU memory once, so no engine decodes faster
than (memory bandwidth) / (weight bytes). This runs raytune-it's vLLM engine (the one the Serve app uses)
on a model directory, greedy with ignore_eos, and prints the measured decode rate, that bound and their
ratio:

    python bench/random_llama.py /tmp/llama-7b --hidden 4096 --layers 32 --intermediate 11008 --heads 32
    python bench/vllm_decode.py /tmp/llama-7b --bandwidth-tbs 4.8      # H200: 4.8 TB/s; H100 SXM: 3.35

Needs vLLM with a CUDA GPU (the ``vllm`` extra). The CPU build runs it too (``--cpu``), for a dry run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path


def weight_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = weights.get_slice(key)
                count = 1
                for size in tensor.get_shape():
                    count *= size
                total += count * {"BF16": 2, "F16": 2, "F32": 4}[tensor.get_dtype()]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--bandwidth-tbs", type=float, required=True, help="the GPU's memory bandwidth, TB/s")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="vLLM's CPU build, float32 (a dry run)")
    args = parser.parse_args()

    from raytune_it.config import load_config
    from raytune_it.serving.engines import create_engine
    from raytune_it.serving.engines.base import GenerationRequest

    overrides = ["serve.engine=vllm", "serve.max_model_len=2048", f"serve.max_tokens_limit={args.max_tokens}"]
    overrides += ["serve.enforce_eager=true", "serve.dtype=float32"] if args.cpu else ["serve.use_gpu=true"]
    config = load_config("tiny-lora", overrides).serve

    async def run() -> list[float]:
        engine = create_engine(config, str(args.model_dir), "bench", 8)
        rates = []
        try:
            for _ in range(args.repeats + 1):
                result = await engine.generate(GenerationRequest(
                    model="bench", synthetic_tokens=32, max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
                rates.append(result.tokens_per_second)
        finally:
            engine.shutdown()
        return rates[1:]  # the first warms up

    rates = asyncio.run(run())
    weights = weight_bytes(args.model_dir)
    bound = args.bandwidth_tbs * 1e12 / weights
    measured = statistics.median(rates)
    print(json.dumps({"weights_gb": round(weights / 1e9, 2), "decode_tokens_per_second": round(measured, 1),
                      "bound_tokens_per_second": round(bound, 1), "ratio_to_bound": round(measured / bound, 3),
                      "runs": [round(r, 1) for r in rates]}))


if __name__ == "__main__":
    main()
