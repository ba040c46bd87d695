"""The loss's memory: one LoRA training step of a LLaMA-3-shaped small model (the 128,256 vocabulary) with
the model's own loss over the full logits (``train.loss_implementation=full``, the old way) against the
chunked loss (``chunked``, the new), on the CPU, in one run.

    python bench/loss_memory.py [--tokens-per-row 512] [--rows 8] [--chunk-tokens 256] [--steps 3] [--rounds 3]

Each figure is a fresh Python process (``--one``), so that its peak is that loss's alone. The process builds
the model (random weights, LLaMA-3's vocabulary and grouped-query attention at a small width, fp32) with
LoRA on its attention projections, installs the loss exactly as the strategies do (``train.loss.install``),
and runs one warm-up step and ``--steps`` timed steps (forward and backward, no optimizer) on the same
seeded batch: 8 rows of 512 tokens, the first quarter of each a prompt that is not trained, the loss
normalised by the trained tokens as the loop does (``num_items_in_batch``). The step's peak memory is the
process's peak RSS (``ru_maxrss``) less its RSS before the first step: what the step added on top of the
model. Rounds alternate the two losses; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

LOSSES = {"old": "full", "new": "chunked"}


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def one(implementation: str, rows: int, tokens: int, chunk_tokens: int, steps: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_it.data.tokenize import IGNORE_INDEX
    from raytune_it.train import loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128_256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens,
                         tie_word_embeddings=False, rope_theta=500_000.0)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    base = model.get_base_model()
    loss.install(base, implementation, chunk_tokens, rows * tokens)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (rows, tokens), generator=generator)
    labels = input_ids.clone()
    labels[:, : tokens // 4] = IGNORE_INDEX
    trained = (labels[:, 1:] != IGNORE_INDEX).sum()
    before = rss_mib()
    seconds, value = [], 0.0
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=labels, num_items_in_batch=trained)
        out.loss.backward()
        if step:
            seconds.append(time.perf_counter() - start)
        value = float(out.loss.detach())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loss": value, "seconds": statistics.median(seconds), "step_peak_mib": peak - before,
                      "model_mib": before}))


def measure(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", LOSSES[name], str(args.rows), str(args.tokens_per_row),
               str(args.chunk_tokens), str(args.steps)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch")
    parser.add_argument("--tokens-per-row", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="train.loss_chunk_tokens of the new loss")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=3, help="processes per loss, alternating")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        implementation, rows, tokens, chunk_tokens, steps = args.one
        one(implementation, int(rows), int(tokens), int(chunk_tokens), int(steps))
        return

    runs: dict[str, list[dict]] = {name: [] for name in LOSSES}
    for round_ in range(args.rounds):
        for name in LOSSES:
            run = measure(name, args)
            runs[name].append(run)
            print(f"round {round_ + 1}/{args.rounds} {name} ({LOSSES[name]}): step {run['seconds']:.2f} s, "
                  f"step peak {run['step_peak_mib']:,.0f} MiB, loss {run['loss']:.8f}", flush=True)
    median = {name: {key: statistics.median(run[key] for run in items) for key in ("seconds", "step_peak_mib")}
              for name, items in runs.items()}
    losses = {name: items[0]["loss"] for name, items in runs.items()}
    print(f"\nLoRA step, LLaMA-3-shaped (vocab 128,256, hidden 256, 2 layers), {args.rows} x {args.tokens_per_row} "
          f"tokens, chunks of {args.chunk_tokens}, median of {args.rounds} processes x {args.steps} steps")
    for name, implementation in LOSSES.items():
        print(f"{name} ({implementation:>7}): step {median[name]['seconds']:.2f} s, "
              f"step peak {median[name]['step_peak_mib']:,.0f} MiB, loss {losses[name]:.8f}")
    print(f"loss |new - old|: {abs(losses['new'] - losses['old']):.2e}")
    print(f"peak-memory new/old: {median['new']['step_peak_mib'] / median['old']['step_peak_mib']:.2f}x")
    print(f"speed new/old: {median['old']['seconds'] / median['new']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
