"""The training loop every Ray Train worker runs, for both methods, read top to bottom.

set up the strategy -> restore the last checkpoint, if any -> for each step:
take ``gradient_accumulation_steps`` micro-batches from this worker's shard, step,
send metrics to the driver -> every ``eval_every_steps`` and at the end: eval loss
and a checkpoint, reported to Ray Train (which writes it to the run's storage) ->
export the tuned model and publish it to the run's storage.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterator

from raytune_it.train.state import StepPlan, TrainState, load_rng_state, save_rng_state


def peak_memory_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _all_reduce(values: list[float], device: Any, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def step_stats(loss: Any, micro_batches: list[dict], pad_id: int, device: Any) -> Any:
    """A step's mean loss and non-padding token count as one float64 tensor on the device,
    summed over workers. Nothing here waits for the device: the loop reads it a step later."""
    import torch
    import torch.distributed as dist

    tokens = sum((batch["input_ids"] != pad_id).sum().to(device) for batch in micro_batches)
    stats = torch.stack([loss.detach().to(device, torch.float64), tokens.to(torch.float64)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)  # queued on the device with NCCL; gloo on the CPU finishes it here
    return stats


def run_steps(queue_step: Callable[[], Any], read: Callable[[Any], None], steps: int, *, read_late: bool,
              read_at_once: Callable[[int], bool]) -> None:
    """Queue ``steps`` steps and read each one back, in order.

    Reading a step (its loss: a host sync) waits for the device. With ``read_late``
    each step is read after the next one is queued, so a GPU works through that
    step while the host reads the one before and a GPU is never idle waiting for
    the host. A step for which ``read_at_once(index)`` holds is read before the
    next is queued: evaluation and checkpoints see the model right after it.
    """
    unread = None
    for index in range(steps):
        queued = queue_step()
        if unread is not None:
            read(unread)
        unread = queued
        if not read_late or read_at_once(index):
            read(unread)
            unread = None
    if unread is not None:
        read(unread)


def evaluate(strategy: Any, batches: list[dict], device: Any) -> float | None:
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch_loss, batch_tokens = strategy.eval_batch(batch)
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    loss_sum, tokens = _all_reduce([loss_sum, tokens], device)
    return loss_sum / tokens if tokens else None


def quiet_worker_logs() -> None:
    """Keep the driver's console to progress, the summary and real errors.

    Every worker's lines reach the driver (``log_to_driver``): per-step INFO lines
    from Ray Train, a per-call bitsandbytes notice, transformers' weight-loading
    bars, the FutureWarnings that peft's and DDP's calls of transformers'
    renamed checkpointing methods raise, and those DeepSpeed's calls of
    torch.distributed's old collective names raise at every step, would repeat
    for every worker and every restart. Warnings and errors still come through, and Ray keeps each worker's
    full log in its session folder.
    """
    import warnings

    from transformers.utils import logging as transformers_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated")
    # DeepSpeed's ZeRO-3 calls torch.distributed's old collective names at every step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    try:  # Ray Train names some loggers by file path
        from ray.train.torch import config as torch_config
        from ray.train.v2._internal.execution import context, storage
        from ray.train.v2.torch import train_loop_utils

        for module in (context, storage, torch_config, train_loop_utils):
            for name in (module.__file__, module.__name__):
                logging.getLogger(name).setLevel(logging.WARNING)
    except ImportError:
        pass


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order: where the job actually landed."""
    import torch.distributed as dist

    import ray

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [node]
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def train_loop(loop_config: dict) -> None:
    import torch

    import ray.train
    import ray.train.torch
    from raytune_it.config.schema import JobConfig
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.data import iter_micro_batches
    from raytune_it.train.strategies.base import make_strategy

    quiet_worker_logs()
    config = JobConfig.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    progress = loop_config.get("progress")
    export = loop_config["export"]  # a storage Location: the run's export/, wherever the run lives
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed)

    tokenizer = load_tokenizer(config.model.name_or_path, revision=config.model.revision,
                               trust_remote_code=config.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    strategy = make_strategy(config, plan.total_steps, device)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            strategy.load_checkpoint(Path(folder))
            state = TrainState.load(Path(folder))
            load_rng_state(Path(folder), rank)
        state.restarts += 1
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_config["has_eval"] else None
    micro, accumulation = config.train.micro_batch_size, config.train.gradient_accumulation_steps

    # Sent with the first step of each attempt: where the workers run and what was built.
    first_report: dict[str, Any] = {"worker_nodes": worker_nodes(), "strategy": strategy.describe()}
    pending: list[dict] = []
    last_flush = time.monotonic()

    def report(metrics: dict, with_checkpoint: bool) -> None:
        """Every step's metrics go to the driver's queue; Ray Train gets eval steps with a checkpoint.

        ``ray.train.report`` is a barrier that waits for the controller's next poll
        (every 2 s), so calling it every step would cap training at one step per poll.
        """
        nonlocal first_report, last_flush
        if progress is not None and rank == 0:
            pending.append(dict(metrics, **first_report))
            first_report = {}
            # One queue call per second, not per step: each call is a round trip to the queue actor.
            if with_checkpoint or time.monotonic() - last_flush > 1.0 or metrics["step"] == plan.total_steps:
                try:
                    progress.put_nowait_batch(pending)
                except Exception:  # a full or gone progress queue must never stop training
                    pass
                pending.clear()
                last_flush = time.monotonic()
        if not with_checkpoint:
            return
        with tempfile.TemporaryDirectory(prefix="raytune-it-ckpt-") as folder:
            # Every rank writes its RNG state; the strategy decides which ranks write model state.
            strategy.save_checkpoint(Path(folder))
            save_rng_state(Path(folder), rank)
            if rank == 0:
                state.save(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{state.step:07d}")

    eval_batches: list[dict] | None = None

    def eval_metrics() -> dict:
        nonlocal eval_batches
        if eval_batches is None:
            # The eval split is small: read this worker's shard once and keep it, instead of paying
            # Ray Data's start-up at every evaluation.
            eval_batches = [] if eval_shard is None else list(
                iter_micro_batches(eval_shard, micro, pad_id, drop_last=False))
        eval_loss = evaluate(strategy, eval_batches, device)
        [peak] = _all_reduce([float(peak_memory_bytes(device))], device, op="max")
        return {"eval_loss": eval_loss if eval_loss is not None else float("nan"), "peak_memory_bytes": int(peak)}

    def account(queued: tuple[Any, float]) -> None:
        """Book a finished step (its loss and tokens were on the device until now), evaluate
        and checkpoint when it is an eval step, and report it."""
        nonlocal tick
        stats, learning_rate = queued
        loss, tokens = stats.tolist()  # waits for that step's work only; the next one is already queued
        seconds, tick = time.perf_counter() - tick, time.perf_counter()
        state.step += 1
        state.batches_in_epoch += accumulation
        state.tokens += int(tokens)
        state.train_seconds += seconds
        metrics = {
            "step": state.step, "epoch": state.epoch, "total_steps": plan.total_steps,
            "loss": loss / context.get_world_size(), "learning_rate": learning_rate,
            "tokens": state.tokens, "tokens_per_second": tokens / seconds if seconds else 0.0,
            "train_seconds": state.train_seconds, "restarts": state.restarts,
        }
        at_eval = is_eval_step(state.step)
        if at_eval:
            metrics.update(eval_metrics())
        report(metrics, with_checkpoint=at_eval)

    def is_eval_step(step: int) -> bool:
        """Whether ``step`` (counted from 1) evaluates and checkpoints."""
        return step % config.train.eval_every_steps == 0 or step == plan.total_steps

    def queue_step(batches: Iterator[dict]) -> tuple[Any, float]:
        micro_batches = list(islice(batches, accumulation))
        loss = strategy.step(micro_batches)
        return step_stats(loss, micro_batches, pad_id, device), strategy.learning_rate()

    while state.step < plan.total_steps:
        batches = iter_micro_batches(train_shard, micro, pad_id, seed=config.train.seed + state.epoch,
                                     group_by_length=config.data.group_by_length,
                                     pin_memory=device.type == "cuda")
        # Resume at the data position: skip what this epoch already consumed.
        for _ in islice(batches, state.batches_in_epoch):
            pass
        # Tuning time is wall time between step ends: data loading, reporting, eval and checkpoints count;
        # the data pipeline's start-up (the first batch of an epoch) does not, like model loading.
        batches = chain(list(islice(batches, accumulation)), batches)
        tick = time.perf_counter()
        steps = min(plan.total_steps - state.step, plan.steps_per_epoch - state.batches_in_epoch // accumulation)
        # A CPU has finished a step when ``step`` returns; a GPU has only queued it.
        run_steps(partial(queue_step, batches), account, steps, read_late=device.type == "cuda",
                  read_at_once=lambda index, first=state.step + 1: is_eval_step(first + index))
        if state.step < plan.total_steps:
            state.epoch += 1
            state.batches_in_epoch = 0

    publish_export(strategy, tokenizer, export, rank)


def publish_export(strategy: Any, tokenizer: Any, export: Any, rank: int) -> None:
    """Every rank takes part in the export (ZeRO-3 gathers its shards); rank 0 writes it to a local folder
    and publishes it to storage, so readers never see a half-written export, on any node."""
    from raytune_it.storage import publish_dir

    with tempfile.TemporaryDirectory(prefix="raytune-it-export-") as folder:
        strategy.export(Path(folder) / "export", tokenizer)
        if rank == 0:
            publish_dir(Path(folder) / "export", export)
