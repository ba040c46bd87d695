"""Tokenize-and-pack throughput: raytune-it's pipeline against a plain loop.

Both read the same ~50,000 generated records from JSONL, render the Alpaca
prompt, tokenize with the same tokenizer, mask the prompt and pack to
max_seq_len. The baseline does it one record at a time in a single process, as a
hand-written script would; the pipeline streams records in batches through the
fast tokenizer's batch call. Run:

    python bench/data_throughput.py [--records 50000] [--real ../shared/data/alpaca_en_demo.json]

It prints records/s for each and the ratio (machines are noisy: compare ratios,
not absolute numbers, across runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def baseline(path: Path, tokenizer, max_seq_len: int) -> int:
    from raytune_it.data.templates import render_prompt

    rows, row = 0, []
    for line in path.open(encoding="utf-8"):
        record = json.loads(line)
        prompt = tokenizer(render_prompt(record), add_special_tokens=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] + prompt + response + [tokenizer.eos_token_id])[:max_seq_len]
        labels = ([-100] * (len(prompt) + 1) + response + [tokenizer.eos_token_id])[:max_seq_len]
        if row and len(row) + len(ids) > max_seq_len:
            rows, row = rows + 1, []
        row += list(zip(ids, labels))
    return rows + bool(row)


def pipeline(path: Path, tokenizer, max_seq_len: int) -> int:
    from raytune_it.config import load_config
    from raytune_it.data.pipeline import iter_examples

    config = load_config("tiny-lora", [f"data.path={path}", "data.packing=true", "data.eval_fraction=0"])
    return sum(1 for _ in iter_examples(config.data, tokenizer, max_seq_len, None, seed=0))


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    rows = fn(*args)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="generated records to process")
    parser.add_argument("--max-seq-len", type=int, default=512, help="packing length")
    parser.add_argument("--real", type=Path, default=Path(__file__).parents[1] / ".." / "shared" / "data" /
                        "alpaca_en_demo.json", help="an Alpaca file to also report statistics for, if present")
    args = parser.parse_args()

    from raytune_it.data.synthetic import generate, write_jsonl
    from raytune_it.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(generate(args.records, seed=0), Path(tmp) / "records.jsonl")
        base_s, base_rows = timed(baseline, path, tokenizer, args.max_seq_len)
        ours_s, ours_rows = timed(pipeline, path, tokenizer, args.max_seq_len)
    base_rate, ours_rate = args.records / base_s, args.records / ours_s
    print(f"records: {args.records:,}  max_seq_len: {args.max_seq_len}")
    print(f"{'':<28}{'seconds':>10}{'records/s':>12}{'packed rows':>13}")
    print(f"{'plain single-process loop':<28}{base_s:>10.2f}{base_rate:>12,.0f}{base_rows:>13,}")
    print(f"{'raytune-it pipeline':<28}{ours_s:>10.2f}{ours_rate:>12,.0f}{ours_rows:>13,}")
    print(f"ratio (raytune-it / plain loop): {ours_rate / base_rate:.2f}x")

    if args.real.is_file():
        from raytune_it.config import load_config
        from raytune_it.data.pipeline import dataset_stats

        config = load_config("tiny-lora", [f"data.path={args.real.resolve()}"])
        stats = dataset_stats(config.data, tokenizer, args.max_seq_len, seed=0)
        print(f"real data {args.real.name}: {stats.records} records, mean {stats.mean_length:.0f} / max "
              f"{stats.max_length} tokens, {stats.truncated} truncated at {args.max_seq_len} "
              "(tiny tokenizer: lengths are in its tokens)")


if __name__ == "__main__":
    main()
