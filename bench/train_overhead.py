"""LoRA training throughput: raytune-it (Ray Train, one worker) against a bare
PyTorch + peft loop and transformers' Trainer, on the same model, data, batch
and steps, measured in one run.

    python bench/train_overhead.py [--steps 200] [--warmup-steps 10] [--micro-batch-size 8]
                                   [--cpus N [N ...]] [--quantization int8|nf4|none] [--recompute]
                                   [--repeats 3] [--account] [--device cpu|cuda] [--model PATH]
                                   [--variants NAME ...] [--peak-tflops T]

It prints tokens/s for each and the ratios against the bare loop. Every variant
times its step loop after the same ``--warmup-steps`` (data loading included;
model loading, worker start-up and the first steps' one-off costs, such as
cuBLAS and allocator warm-up on a GPU, excluded) and counts the same
non-padding tokens: raytune-it's figure comes from its per-step metrics. More variants split
the gap: the bare loop as a Ray task and as the training function of a
one-worker Ray Train job (what Ray's runtime and Ray Train's worker cost), and
raytune-it with ``data.group_by_length=true`` (what grouping micro-batches by
length gains over the bare loop's padding; off by default, see docs/training.md).

``--cpus`` is how many cores every variant computes on (torch threads, and the
Ray worker's CPUs). By default it measures two settings: one core fewer than
the machine has, leaving one to Ray's own processes as a GPU node's spare host
cores do, and all of them, where the compute threads share every core with
Ray's processes. ``--account`` shows which processes shared the cores.

``--device cuda`` runs every variant on one GPU (bf16 compute, like raytune-it's
LoRA strategy there); Ray is then started once for all the Ray variants, as the
host has cores to spare (on the CPU each Ray variant starts its own, so that the
bare loop and Trainer run without Ray's processes beside them). ``--model``
trains another model directory than the tiny LLaMA, and ``--variants`` picks
variants by their short names.

``--quantization`` picks the base's weights (INT8 by default, NF4 as QLoRA, or none: bf16 on a GPU) and
``--recompute`` turns LoRA's activation recomputation on for every variant (off by default, so that the
bare loop's own model compares like for like); every variant trains the peft model raytune-it's LoRA
strategy builds (``lora_model``), so the loops around it are all that differ. On a GPU each variant run
in this process (and raytune-it, from its per-step metrics) also reports its peak GPU memory, and the
table shows the model FLOPs utilisation, MFU = 6 x parameters x tokens/s over the GPU's dense bf16 peak
(known for H100, H200, A100 and A800, or ``--peak-tflops``), the convention that counts neither the
recompute nor LoRA's frozen weights' skipped gradients.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

#: Short names for --variants, in the order the rounds run them.
VARIANTS = {"bare": "bare PyTorch + peft loop", "trainer": "transformers Trainer",
            "ray-task": "bare loop in a Ray task", "ray-train": "bare loop in Ray Train",
            "raytune-it": "raytune-it (Ray Train)", "grouped": "raytune-it, length groups"}


#: Where the bare loops' prepared split lives for the whole benchmark (this process and its Ray workers).
PREPARED = tempfile.mkdtemp(prefix="raytune-it-bench-data-")
atexit.register(shutil.rmtree, PREPARED, ignore_errors=True)


def setup(args, cpus):
    from raytune_it.config import load_config
    from raytune_it.models.loading import load_tokenizer

    overrides = [f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch_size}",
                 "scaling.num_workers=1", f"scaling.cpus_per_worker={cpus}", "data.eval_fraction=0.02",
                 f"train.eval_every_steps={args.steps}", f"lora.quantization={args.quantization}",
                 "deepspeed.gradient_checkpointing=false",
                 f"lora.gradient_checkpointing={str(args.recompute).lower()}", "train.warmup_ratio=0",
                 f"scaling.use_gpu={str(args.device == 'cuda').lower()}",
                 f"train.loss_implementation={args.loss}"]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    config = load_config("tiny-lora", overrides)
    return config, load_tokenizer(config.model.name_or_path)


def device_of(config):
    import torch

    return torch.device("cuda" if config.scaling.use_gpu else "cpu")


def batches(config, tokenizer, count):
    """The micro-batches raytune-it's one worker trains on, in its order (the prepared split in the first
    epoch's seeded order, collated as its loop collates them), so every variant pads the same rows. Prepared
    once into ``PREPARED`` (later rounds find it by its key and tokenize nothing), removed at exit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytune_it.config.loading import with_overrides
    from raytune_it.train.data import epoch_rows, micro_batch_rows, micro_batches, row_lengths
    from raytune_it.train.prepared import prepare

    config = with_overrides(config, {"data.prepared_root": PREPARED})
    prepared, _ = prepare(config, tokenizer)
    tables = []
    for file in prepared.files("train"):
        with file.open_input_file() as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    order = epoch_rows(table.num_rows, config.train.seed, 0, 0, 1)
    rows = micro_batch_rows(order, row_lengths(table), config.train.micro_batch_size, drop_last=True,
                            group_by_length=False)
    return list(islice(micro_batches(table, rows, tokenizer.pad_token_id), count))


def peft_model(config):
    """The peft model raytune-it's LoRA strategy trains (its precision, quantization and recomputation), on
    the run's device."""
    from raytune_it.train.strategies.lora import lora_model

    device = device_of(config)
    model = lora_model(config, device)
    return model if config.lora.quantization != "none" else model.to(device)  # bitsandbytes placed its own


class PeakMemory:
    """The GPU's peak allocated memory over a block (None on the CPU, where the allocator keeps no peak)."""

    def __init__(self, device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()


class WarmClock:
    """Tokens and seconds after the first ``warmup`` steps: what every variant reports."""

    def __init__(self, warmup: int, device) -> None:
        self.warmup, self.device, self.started, self.tokens_at_start = warmup, device, None, 0

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is queued: wait for it before reading the clock
        return time.perf_counter()

    def step_done(self, step: int, tokens_so_far: int) -> None:
        """Call with step 0 before the first step, then after each; the clock starts after ``warmup``."""
        if step == self.warmup:
            self.started, self.tokens_at_start = self._now(), tokens_so_far

    def rate(self, tokens_so_far: int) -> float:
        return (tokens_so_far - self.tokens_at_start) / (self._now() - self.started)


def bare_loop(config, tokenizer, steps, warmup):
    data = batches(config, tokenizer, steps)
    device = device_of(config)
    with PeakMemory(device) as memory:
        rate = _bare_steps(config, tokenizer, data, steps, warmup, device)
    return rate, memory.peak


def _bare_steps(config, tokenizer, data, steps, warmup, device):
    import torch
    from transformers import get_scheduler

    from raytune_it.train.strategies.base import adamw

    model = peft_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer as raytune-it (torch's fused AdamW): the comparison is about the loop around it.
    optimizer = adamw(params, config.train.learning_rate, 0.0)
    scheduler = get_scheduler("cosine", optimizer, 0, steps)
    model.train()
    clock, tokens = WarmClock(warmup, device), 0
    clock.step_done(0, 0)
    for step, batch in enumerate(data, start=1):
        loss = model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        clock.step_done(step, tokens)
    return clock.rate(tokens)


def hf_trainer(config, tokenizer, steps, warmup, folder):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from raytune_it.data.pipeline import iter_examples
    from raytune_it.data.tokenize import collate

    examples = list(islice(iter_examples(config.data, tokenizer, config.train.max_seq_len, "train",
                                         config.train.seed), steps * config.train.micro_batch_size))
    batch_tokens: list[int] = []  # non-padding tokens of each batch, in the order the steps take them

    def collate_counting(rows):
        batch_tokens.append(sum(len(row["input_ids"]) for row in rows))
        return collate(rows, tokenizer.pad_token_id)

    clock = WarmClock(warmup, device_of(config))

    class Clock(TrainerCallback):
        def on_train_begin(self, arguments, state, control, **kwargs):
            clock.step_done(0, 0)

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step == warmup:
                # The data loader may have collated a batch ahead: count the batches of the steps taken.
                clock.step_done(warmup, sum(batch_tokens[:warmup]))

    arguments = TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=config.train.micro_batch_size, max_steps=steps,
        learning_rate=config.train.learning_rate, lr_scheduler_type="cosine", save_strategy="no",
        report_to=[], logging_steps=steps, use_cpu=not config.scaling.use_gpu, dataloader_num_workers=0,
        seed=config.train.seed, disable_tqdm=True, remove_unused_columns=False)
    with PeakMemory(device_of(config)) as memory:
        trainer = Trainer(model=peft_model(config), args=arguments, train_dataset=examples,
                          data_collator=collate_counting, callbacks=[Clock()])
        trainer.train()
        rate = clock.rate(sum(batch_tokens[:steps]))
    return rate, memory.peak


def bare_loop_in_ray_worker(config, steps, warmup):
    """The bare loop again, as a Ray task with the same CPUs: what the Ray runtime alone costs here."""
    import ray

    from raytune_it.cluster import ray_session

    cpus = config.scaling.cpus_per_worker
    with ray_session(min_cpus=cpus):
        task = ray.remote(num_cpus=cpus, num_gpus=int(config.scaling.use_gpu))(_bare_loop_task)
        return ray.get(task.remote(config, steps, warmup))


def bare_loop_in_ray_train_worker(config, steps, warmup, folder):
    """The bare loop again, as the training function of a one-worker TorchTrainer: Ray Train's own cost."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_it.cluster import ray_session

    cpus = config.scaling.cpus_per_worker
    folder.mkdir(parents=True, exist_ok=True)
    rate_file = folder / "tokens_per_second.txt"

    def train_fn(_):
        # Train V2 keeps only checkpointed metrics in its Result: the rate comes back through a file.
        rate_file.write_text(json.dumps(_bare_loop_task(config, steps, warmup)))

    with ray_session(min_cpus=cpus):
        TorchTrainer(train_fn, scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.scaling.use_gpu else {})}),
            run_config=ray.train.RunConfig(storage_path=str(folder))).fit()
    rate, peak = json.loads(rate_file.read_text())
    return rate, peak


def _bare_loop_task(config, steps, warmup):
    from raytune_it.models.loading import load_tokenizer

    return bare_loop(config, load_tokenizer(config.model.name_or_path), steps, warmup)


def raytune_it_run(config, warmup, folder, group_by_length=False):
    from raytune_it.train.driver import read_history, run_dir_of, train

    config = config.model_copy(deep=True)
    config.run.storage = str(folder)
    config.data.group_by_length = group_by_length
    train(config)
    # Its metrics hold every step's running totals: the rate after the warm-up steps, like the others.
    history = read_history(run_dir_of(config) / "metrics.jsonl")
    start, end = history[warmup - 1] if warmup else {"tokens": 0, "train_seconds": 0.0}, history[-1]
    peaks = [step["peak_memory_bytes"] for step in history if step.get("peak_memory_bytes")]
    return ((end["tokens"] - start["tokens"]) / (end["train_seconds"] - start["train_seconds"]),
            max(peaks) if peaks and config.scaling.use_gpu else None)


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
    steps, warmup = args.steps, args.warmup_steps
    runners = {
        "bare": lambda i: bare_loop(config, tokenizer, steps, warmup),
        "trainer": lambda i: hf_trainer(config, tokenizer, steps, warmup, folder / f"hf{i}"),
        "ray-task": lambda i: bare_loop_in_ray_worker(config, steps, warmup),
        "ray-train": lambda i: bare_loop_in_ray_train_worker(config, steps, warmup, folder / f"rt{i}"),
        "raytune-it": lambda i: raytune_it_run(config, warmup, folder / f"runs{i}"),
        "grouped": lambda i: raytune_it_run(config, warmup, folder / f"grouped{i}", True),
    }
    variants = {VARIANTS[key]: run for key, run in runners.items() if key in args.variants}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    shared_ray = contextlib.nullcontext()
    if config.scaling.use_gpu and set(args.variants) & {"ray-task", "ray-train", "raytune-it", "grouped"}:
        from raytune_it.cluster import ray_session

        shared_ray = ray_session(min_cpus=cpus)
    try:
        with shared_ray:
            # Interleaved rounds: a slow spell on this shared machine hits every variant, not one.
            for round_index in range(args.repeats):
                for name, run in variants.items():
                    rate, peak = run(round_index)
                    samples[name].append(rate)
                    if peak:
                        peaks[name].append(peak)
                    print(f"[{cpus} cores] round {round_index + 1}/{args.repeats} {name}: "
                          f"{samples[name][-1]:,.0f} tokens/s", flush=True)
            accounts = account(variants, cpus) if args.account else {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = {name: statistics.median(rates) for name, rates in samples.items()}
    print_results(args, cpus, config, results, samples, accounts, {name: max(p) for name, p in peaks.items() if p})


def print_results(args, cpus, config, results, samples, accounts, peaks) -> None:
    base = results.get(VARIANTS["bare"])
    spare = (os.cpu_count() or cpus) - cpus
    where = (f"one GPU ({_gpu_name()}), {cpus} CPU(s) for the worker" if config.scaling.use_gpu else
             f"one worker on {cpus} of {os.cpu_count()} cores ({spare} left to Ray's own processes)")
    base_weights = {"int8": "INT8", "nf4": "NF4", "none": "bf16" if config.scaling.use_gpu else "fp32"}
    print(f"\nLoRA ({base_weights[args.quantization]} base{', recomputed activations' if args.recompute else ''}), "
          f"{Path(config.model.name_or_path).name}, "
          f"{args.steps} steps x {args.micro_batch_size} sequences (timed after {args.warmup_steps}), {where}, "
          f"median of {args.repeats} interleaved rounds")
    peak_flops = _peak_flops(args) if config.scaling.use_gpu else None
    parameters = _parameters(config.model.name_or_path)
    print(f"{'':<30}{'tokens/s':>10}{'vs bare loop':>14}{'peak GiB':>10}{'MFU':>7}   all rounds")
    for name, rate in results.items():
        rounds = ", ".join(f"{r:,.0f}" for r in samples[name])
        ratio = f"{rate / base:>13.2f}x" if base else f"{'-':>14}"
        peak = f"{peaks[name] / 2**30:>10.2f}" if name in peaks else f"{'-':>10}"
        mfu = f"{6 * parameters * rate / peak_flops:>7.1%}" if peak_flops else f"{'-':>7}"
        print(f"{name:<30}{rate:>10,.0f}{ratio}{peak}{mfu}   {rounds}")
    if config.scaling.use_gpu:
        print(f"MFU: 6 x {parameters / 1e9:.2f}B parameters x tokens/s over "
              + (f"{peak_flops / 1e12:,.0f} TFLOPS (dense bf16)" if peak_flops else
                 "an unknown peak (pass --peak-tflops)"))
    ratios = [  # (numerator, denominator, what the ratio shows), printed where both were measured
        ("raytune-it", "trainer", "raytune-it / Trainer"),
        ("grouped", "trainer", "raytune-it with data.group_by_length=true / Trainer"),
        ("ray-task", "bare", "the Ray runtime beside the loop"),
        ("ray-train", "ray-task", "Ray Train's worker and controller"),
        ("raytune-it", "ray-train", "raytune-it's loop: Ray Data ingest, metrics, checkpoints"),
        ("grouped", "raytune-it", "data.group_by_length: less padding"),
    ]
    for top, bottom, meaning in ratios:
        if VARIANTS[top] in results and VARIANTS[bottom] in results:
            print(f"{VARIANTS[top]} / {VARIANTS[bottom]}: {results[VARIANTS[top]] / results[VARIANTS[bottom]]:.2f}x"
                  f" ({meaning})")
    for name, table in accounts.items():
        print(f"\nprocesses while '{name}' trained (one extra, untimed run):\n{table}")


#: Dense bf16 tensor-core peaks (TFLOPS) by the name torch reports, most specific first.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("A800", 312.0)]


def _peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    name = _gpu_name()
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def _parameters(name_or_path: str) -> int:
    """The model's parameters, from its config.json (raytune-it's one derivation of a model's shape)."""
    from raytune_it.models.loading import resolve_model_path
    from raytune_it.models.shape import shape_from_hf_config

    return shape_from_hf_config(resolve_model_path(name_or_path, weights=False)).parameters


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible"


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200,
                        help="optimizer steps for each variant (the default stays inside one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="steps each variant takes before its clock starts (their one-off costs, such as "
                             "cuBLAS and allocator warm-up on a GPU, are not throughput)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--loss", choices=["full", "chunked", "auto"], default="full",
                        help="raytune-it's train.loss_implementation: 'full' (the default here) is the bare loop's own "
                        "loss, so the two compare like for like; 'chunked' shows what the loss that never builds the "
                        "full logits costs in time")
    parser.add_argument("--quantization", choices=["int8", "nf4", "none"], default=None,
                        help="the base's weights: INT8 (the default), NF4 (QLoRA) or none (bf16 on a GPU, fp32 on "
                             "the CPU); lora.quantization for raytune-it")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="shorthand: --int8 is --quantization int8, --no-int8 is --quantization none")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in the backward pass for every variant (LoRA's gradient "
                             "checkpointing, raytune-it's default; off here by default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU, where its name is not in the built-in table")
    parser.add_argument("--cpus", type=int, nargs="+", default=None,
                        help="cores each variant computes on (torch threads; the Ray worker's CPUs); several "
                             f"values measure each setting in turn (default on the CPU: {max(1, cores - 1)} and "
                             f"{cores}, with and without a core left to Ray's own processes; with --device cuda: "
                             f"{min(4, cores)})")
    parser.add_argument("--account", action="store_true",
                        help="after the timed rounds, run the bare loop, the bare loop in Ray Train and raytune-it "
                             "once more while sampling /proc, and print which processes shared the cores with "
                             "training (cores used and wake-ups per second); not counted in the medians")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each round runs every variant once, interleaved, and the median is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where every variant computes: the CPU, or one GPU (raytune-it with scaling.use_gpu)")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model directory to train instead of the built-in tiny-llama")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (default: all): " +
                             "; ".join(f"{key}: {name}" for key, name in VARIANTS.items()))
    args = parser.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be at least 0 and below --steps ({args.steps})")
    if args.account and not {"bare", "ray-train", "raytune-it"} <= set(args.variants):
        parser.error("--account needs the variants bare, ray-train and raytune-it")
    if args.quantization is None:
        args.quantization = "int8" if args.int8 else "none"
    if args.cpus is None:
        args.cpus = [min(4, cores)] if args.device == "cuda" else sorted({max(1, cores - 1), cores})
    for cpus in args.cpus:
        measure(args, cpus)


if __name__ == "__main__":
    main()
