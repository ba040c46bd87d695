"""Eval throughput: the same models on the same held-out examples, three ways, in one run.

1. batch-1: what eval did before, ``model.generate`` on one example at a time in one process;
2. batched: the transformers engine through ``generation.answers`` (eval's path now), ``--batch`` prompts
   per call (default: the engine's own, 16);
3. vllm: the vLLM engine (CPU build here) through the same path, as many prompts per call as its scheduler
   runs at once; only where vLLM is installed (``.venv-vllm``), else skipped with the reason.

Prints examples/s for each and the ratios, ending with ``batched/batch-1: N.NNx`` and ``vllm/batch-1: N.NNx``.

    python bench/eval_throughput.py                  # main environment: batch-1 and batched
    .venv-vllm/bin/python bench/eval_throughput.py   # all three

On a GPU (``--device cuda``, bf16) with another base (``--model PATH``, such as ``bench/random_llama.py``'s
7B shape), it scores that base alone: the tiny adapter does not fit another model's shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import time


def batch_one(records, models, max_new_tokens, base="tiny-llama", device="cpu"):
    """The old harness: a model and tokenizer per model, one greedy ``generate`` per example."""
    from pathlib import Path

    import torch
    from peft import PeftModel

    from raytune_it.data.templates import render_prompt
    from raytune_it.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    answers = {}
    for name, path in models.items():
        folder = resolve_model_path(path)
        tokenizer = load_tokenizer(base)
        model = load_causal_lm(base, precision="bfloat16" if device == "cuda" else "float32")
        if (Path(folder) / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(model, folder)
        model.to(device).eval()
        answers[name] = []
        for record in records:
            inputs = tokenizer(render_prompt(record), return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answers[name].append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def engine_path(records, models, max_new_tokens, engine, batch, base="tiny-llama", device="cpu"):
    from raytune_it.config import load_config
    from raytune_it.generation.answers import Answerer, Sampling, resolve_models

    config = load_config("tiny-lora", [f"serve.engine={engine}", "serve.max_model_len=512",  # eval's defaults
                                       f"serve.use_gpu={str(device == 'cuda').lower()}"])
    entries = resolve_models(base, models, "bench")
    answerer = Answerer(config.serve, config.data, batch, entries)
    answers = {}
    try:
        answerer.engine(entries[0].weights)  # the engine starts before the clock, as batch-1 loads its model
        started = time.perf_counter()
        for entry in entries:
            answers[entry.name] = [a.completion for part in answerer.answers(entry, records, Sampling(max_new_tokens))
                                   for a in part]
        return answers, time.perf_counter() - started
    finally:
        answerer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="held-out examples per model")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="eval.max_new_tokens")
    parser.add_argument("--batch", type=int, default=None,
                        help="eval.batch_size for the engine paths (default: each engine's own, as eval's)")
    parser.add_argument("--model", default=None,
                        help="score this base model (a folder) alone instead of tiny-llama and a tiny adapter")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where every path runs: the CPU, or one GPU (bf16)")
    args = parser.parse_args()

    import sys
    import tempfile
    from pathlib import Path

    from raytune_it.data.synthetic import generate
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import train_tiny_adapter  # noqa: E402 - a real adapter, as eval scores one

    records = list(generate(args.examples, seed=1_000_003))
    base = args.model or "tiny-llama"
    if args.model:
        models = {"base": base}
    else:
        adapter = train_tiny_adapter(Path(tempfile.mkdtemp()) / "adapter", ["dosage", "bmi"], steps=4)
        models = {"base": base, "adapter": str(adapter)}
    examples = len(records) * len(models)
    where = {"base": base, "device": args.device}

    started = time.perf_counter()
    batch_one(records, models, args.max_new_tokens, **where)
    base_seconds = time.perf_counter() - started
    rates = {"batch-1": examples / base_seconds}
    _, seconds = engine_path(records, models, args.max_new_tokens, "transformers", args.batch, **where)
    rates["batched"] = examples / seconds
    vllm_reason = None
    if importlib.util.find_spec("vllm") is not None:
        _, seconds = engine_path(records, models, args.max_new_tokens, "vllm", args.batch, **where)
        rates["vllm"] = examples / seconds
    else:
        vllm_reason = "vLLM is not installed here: run this script with .venv-vllm/bin/python"
    batch = args.batch or "each engine's own"
    print(f"{examples} answers ({len(models)} models x {len(records)} examples, {args.max_new_tokens} new tokens "
          f"each, batch {batch})")
    for name, rate in rates.items():
        print(f"  {name:8s} {rate:8.2f} examples/s")
    print(f"batched/batch-1: {rates['batched'] / rates['batch-1']:.2f}x")
    print(f"vllm/batch-1: {rates['vllm'] / rates['batch-1']:.2f}x" if "vllm" in rates else
          f"vllm/batch-1: skipped ({vllm_reason})")


if __name__ == "__main__":
    main()
