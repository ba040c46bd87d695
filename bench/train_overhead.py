"""LoRA training throughput: raytune-it (Ray Train, one worker) against a bare
PyTorch + peft loop and transformers' Trainer, on the same model, data, batch
and steps, measured in one run.

    python bench/train_overhead.py [--steps 200] [--micro-batch-size 8] [--cpus N [N ...]]
                                   [--int8 | --no-int8] [--repeats 3] [--account]

It prints tokens/s for each and the ratios against the bare loop. Every variant
times its whole step loop (data loading included; model loading and worker
start-up excluded) and counts the same non-padding tokens. More variants split
the gap: the bare loop as a Ray task and as the training function of a
one-worker Ray Train job (what Ray's runtime and Ray Train's worker cost), and
raytune-it with ``data.group_by_length=true`` (what grouping micro-batches by
length gains over the bare loop's padding; off by default, see docs/training.md).

``--cpus`` is how many cores every variant computes on (torch threads, and the
Ray worker's CPUs). By default it measures two settings: one core fewer than
the machine has, leaving one to Ray's own processes as a GPU node's spare host
cores do, and all of them, where the compute threads share every core with
Ray's processes. ``--account`` shows which processes shared the cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path


def setup(args, cpus):
    from raytune_it.config import load_config
    from raytune_it.models.loading import load_tokenizer

    overrides = [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch_size}",
                 "scaling.num_workers=1", f"scaling.cpus_per_worker={cpus}", "data.eval_fraction=0.02",
                 f"train.eval_every_steps={args.steps}", f"lora.int8={str(args.int8).lower()}",
                 "deepspeed.gradient_checkpointing=false", "train.warmup_ratio=0"]
    config = load_config("tiny-lora", overrides)
    return config, load_tokenizer(config.model.name_or_path)


def batches(config, tokenizer, count):
    from raytune_it.data.pipeline import iter_examples
    from raytune_it.data.tokenize import collate

    examples = iter_examples(config.data, tokenizer, config.train.max_seq_len, "train", config.train.seed)
    mb = config.train.micro_batch_size
    out = []
    while len(out) < count:
        chunk = list(islice(examples, mb))
        out.append(collate(chunk, tokenizer.pad_token_id))
    return out


def peft_model(config):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from raytune_it.models.loading import load_causal_lm

    base = load_causal_lm(config.model.name_or_path, precision="float32" if config.lora.int8 else "bfloat16",
                          int8=config.lora.int8, device_map={"": "cpu"} if config.lora.int8 else None)
    if config.lora.int8:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return get_peft_model(base, LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                                           lora_dropout=config.lora.dropout,
                                           target_modules=config.lora.target_modules, task_type="CAUSAL_LM"))


def bare_loop(config, tokenizer, steps):
    import torch
    from transformers import get_scheduler

    data = batches(config, tokenizer, steps)
    model = peft_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate)
    scheduler = get_scheduler("cosine", optimizer, 0, steps)
    model.train()
    tokens, started = 0, time.perf_counter()
    for batch in data:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
    return tokens / (time.perf_counter() - started)


def hf_trainer(config, tokenizer, steps, folder):
    from transformers import Trainer, TrainingArguments

    from raytune_it.data.pipeline import iter_examples
    from raytune_it.data.tokenize import collate

    examples = list(islice(iter_examples(config.data, tokenizer, config.train.max_seq_len, "train",
                                         config.train.seed), steps * config.train.micro_batch_size))
    tokens = sum(len(e["input_ids"]) for e in examples)
    arguments = TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=config.train.micro_batch_size, max_steps=steps,
        learning_rate=config.train.learning_rate, lr_scheduler_type="cosine", save_strategy="no",
        report_to=[], logging_steps=steps, use_cpu=True, dataloader_num_workers=0, seed=config.train.seed,
        disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=peft_model(config), args=arguments, train_dataset=examples,
                      data_collator=lambda rows: collate(rows, tokenizer.pad_token_id))
    started = time.perf_counter()
    trainer.train()
    return tokens / (time.perf_counter() - started)


def bare_loop_in_ray_worker(config, steps):
    """The bare loop again, as a Ray task with the same CPUs: what the Ray runtime alone costs here."""
    import ray

    from raytune_it.cluster import ray_session

    cpus = config.scaling.cpus_per_worker
    with ray_session(min_cpus=cpus):
        return ray.get(ray.remote(num_cpus=cpus)(_bare_loop_task).remote(config, steps))


def bare_loop_in_ray_train_worker(config, steps, folder):
    """The bare loop again, as the training function of a one-worker TorchTrainer: Ray Train's own cost."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_it.cluster import ray_session

    cpus = config.scaling.cpus_per_worker
    folder.mkdir(parents=True, exist_ok=True)
    rate_file = folder / "tokens_per_second.txt"

    def train_fn(_):
        # Train V2 keeps only checkpointed metrics in its Result: the rate comes back through a file.
        rate_file.write_text(str(_bare_loop_task(config, steps)))

    with ray_session(min_cpus=cpus):
        TorchTrainer(train_fn, scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(storage_path=str(folder))).fit()
    return float(rate_file.read_text())


def _bare_loop_task(config, steps):
    from raytune_it.models.loading import load_tokenizer

    return bare_loop(config, load_tokenizer(config.model.name_or_path), steps)


def raytune_it_run(config, folder, group_by_length=False):
    from raytune_it.train.driver import train

    config = config.model_copy(deep=True)
    config.run.storage = str(folder)
    config.data.group_by_length = group_by_length
    summary = train(config)
    return summary.tokens_per_second


def account(variants: dict, cpus: int) -> dict[str, str]:
    """One more run of three variants under the /proc sampler: who shared the cores with training."""
    from proc_account import ProcessSampler

    tables = {}
    for name in ("bare PyTorch + peft loop", "bare loop in Ray Train", "raytune-it (Ray Train)"):
        with ProcessSampler(busy_cores=0.8 * cpus) as sampler:
            variants[name]("account")
        tables[name] = sampler.table()
    return tables


def measure(args, cpus: int) -> None:
    """Every variant on ``cpus`` cores, in interleaved rounds; prints the table and the ratios."""
    import statistics

    import torch

    torch.set_num_threads(cpus)  # the in-process variants; Ray gives its workers OMP_NUM_THREADS=cpus
    config, tokenizer = setup(args, cpus)
    folder = Path(tempfile.mkdtemp(prefix="raytune-it-bench-"))
    variants = {
        "bare PyTorch + peft loop": lambda i: bare_loop(config, tokenizer, args.steps),
        "transformers Trainer": lambda i: hf_trainer(config, tokenizer, args.steps, folder / f"hf{i}"),
        "bare loop in a Ray task": lambda i: bare_loop_in_ray_worker(config, args.steps),
        "bare loop in Ray Train": lambda i: bare_loop_in_ray_train_worker(config, args.steps, folder / f"rt{i}"),
        "raytune-it (Ray Train)": lambda i: raytune_it_run(config, folder / f"runs{i}"),
        "raytune-it, length groups": lambda i: raytune_it_run(config, folder / f"grouped{i}", True),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        # Interleaved rounds: a slow spell on this shared machine hits every variant, not one.
        for round_index in range(args.repeats):
            for name, run in variants.items():
                samples[name].append(run(round_index))
                print(f"[{cpus} cores] round {round_index + 1}/{args.repeats} {name}: "
                      f"{samples[name][-1]:,.0f} tokens/s", flush=True)
        accounts = account(variants, cpus) if args.account else {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = {name: statistics.median(rates) for name, rates in samples.items()}
    base = results["bare PyTorch + peft loop"]
    spare = (os.cpu_count() or cpus) - cpus
    print(f"\nLoRA ({'INT8' if args.int8 else 'bf16'} base), tiny-llama, {args.steps} steps x "
          f"{args.micro_batch_size} sequences, one worker on {cpus} of {os.cpu_count()} cores "
          f"({spare} left to Ray's own processes), median of {args.repeats} interleaved rounds")
    print(f"{'':<30}{'tokens/s':>10}{'vs bare loop':>14}   all rounds")
    for name, rate in results.items():
        rounds = ", ".join(f"{r:,.0f}" for r in samples[name])
        print(f"{name:<30}{rate:>10,.0f}{rate / base:>13.2f}x   {rounds}")
    ours, trainer = results["raytune-it (Ray Train)"], results["transformers Trainer"]
    grouped = results["raytune-it, length groups"]
    print(f"raytune-it / Trainer: {ours / trainer:.2f}x; with data.group_by_length=true: {grouped / trainer:.2f}x")
    in_task, in_train = results["bare loop in a Ray task"], results["bare loop in Ray Train"]
    print(f"bare loop in a Ray task / bare loop: {in_task / base:.2f}x (the Ray runtime beside the loop)")
    print(f"bare loop in Ray Train / in a Ray task: {in_train / in_task:.2f}x (Ray Train's worker and controller)")
    print(f"raytune-it / bare loop in Ray Train: {ours / in_train:.2f}x (raytune-it's loop: Ray Data ingest, "
          "metrics, checkpoints)")
    print(f"raytune-it with length groups / without: {grouped / ours:.2f}x (data.group_by_length: less padding)")
    for name, table in accounts.items():
        print(f"\nprocesses while '{name}' trained (one extra, untimed run):\n{table}")


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200,
                        help="optimizer steps for each variant (the default stays inside one epoch)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="INT8 base weights")
    parser.add_argument("--cpus", type=int, nargs="+", default=sorted({max(1, cores - 1), cores}),
                        help="cores each variant computes on (torch threads; the Ray worker's CPUs); several "
                             f"values measure each setting in turn (default: {max(1, cores - 1)} and {cores}, "
                             "with and without a core left to Ray's own processes)")
    parser.add_argument("--account", action="store_true",
                        help="after the timed rounds, run the bare loop, the bare loop in Ray Train and raytune-it "
                             "once more while sampling /proc, and print which processes shared the cores with "
                             "training (cores used and wake-ups per second); not counted in the medians")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each round runs every variant once, interleaved, and the median is reported")
    args = parser.parse_args()
    for cpus in args.cpus:
        measure(args, cpus)


if __name__ == "__main__":
    main()
