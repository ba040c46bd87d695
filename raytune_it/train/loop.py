"""The training loop every Ray Train worker runs, for both methods, read top to bottom (``Recipe.run``).

set up the strategy -> restore the last checkpoint, if any -> for each epoch, this
worker's rows in the epoch's seeded order, from the data position -> for each step:
``gradient_accumulation_steps`` micro-batches, the loss over the step's trained tokens
on all workers, backward, optimizer step, metrics to the driver -> every
``eval_every_steps`` and at the end: eval loss and a checkpoint, reported to Ray Train
(which writes it to the run's storage) -> export the tuned model and publish it to
the run's storage.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from raytune_it.train.state import StepPlan, TrainState, load_rng_state, save_rng_state
from raytune_it.train.step_metrics import NO_EVAL, StepMetrics

if TYPE_CHECKING:
    from raytune_it.train.strategies.base import Strategy


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


def global_trained_tokens(micro_batches: list[dict], device: Any) -> Any:
    """The step's trained tokens over all its micro-batches and all workers: the loss's denominator.

    Dividing the summed token losses of every micro-batch by this one count gives each trained token the
    same weight, however the step's tokens fall into micro-batches and workers: gradient accumulation
    4 x batch 1 is batch 4, and 2 workers are 1 worker with twice the batch (transformers since 4.46 and
    torchtune normalise the same way). A float tensor on the device; nothing here waits for it."""
    import torch
    import torch.distributed as dist

    from raytune_it.train.strategies.base import trained_tokens

    local = sum(trained_tokens(batch["labels"]) for batch in micro_batches)
    count = torch.tensor(float(local), dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return count


def step_stats(loss_sum: Any, trained: Any, tokens: int, device: Any) -> Any:
    """A step's mean token loss (over all workers) and its token count as one float64 tensor on the
    device. Nothing here waits for the device: the loop reads it a step later."""
    import torch
    import torch.distributed as dist

    sums = torch.stack([loss_sum.detach().to(device, torch.float64),
                        torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)  # queued on the device with NCCL; gloo on the CPU finishes it here
    return torch.stack([sums[0] / trained.to(torch.float64).clamp(min=1), sums[1]])


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


def evaluate(strategy: Strategy, batches: list[dict], device: Any) -> float | None:
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        batch_loss, batch_tokens = strategy.eval_batch(batch)
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    loss_sum, tokens = _all_reduce([loss_sum, tokens], device)
    return loss_sum / tokens if tokens else None


def quiet_worker_logs() -> None:
    """Keep the driver's console to progress, the summary and real errors.

    Every worker's lines reach the driver (``log_to_driver``): per-step INFO lines
    from Ray Train, the libraries' once-per-process notices (``quiet.quiet_library_noise``),
    and the FutureWarnings that DeepSpeed's calls of torch.distributed's old collective
    names raise at every step, would repeat for every worker and every restart. Warnings
    and errors still come through, and Ray keeps each worker's full log in its session
    folder.
    """
    import warnings

    from raytune_it.quiet import quiet_library_noise

    quiet_library_noise()
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
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [node]
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs: the recipe below, set up from the driver's loop config."""
    quiet_worker_logs()
    Recipe(loop_config).run()


class Recipe:
    """One worker's training run, read top to bottom: ``run`` is the whole recipe; each method is a step
    of it. State that outlives a restart lives in ``TrainState`` and is checkpointed with the model."""

    def __init__(self, loop_config: dict) -> None:
        import ray.train
        import ray.train.torch
        import torch

        from raytune_it.config.schema import JobConfig
        from raytune_it.data.prompt_format import PromptFormat
        from raytune_it.models.loading import load_tokenizer

        self.config = config = JobConfig.model_validate(loop_config["config"])
        self.plan = StepPlan(**loop_config["plan"])
        self.progress = loop_config.get("progress")
        self.export_location = loop_config["export"]  # a storage Location: the run's export/
        self.splits = loop_config["splits"]  # by split name: SplitBlocks in the object store, or a StreamedSplit
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(config.train.seed)
        self.tokenizer = load_tokenizer(config.model.name_or_path, revision=config.model.revision,
                                        trust_remote_code=config.model.trust_remote_code)
        # The export's tokenizer carries the run's prompt format (its chat template, if any).
        PromptFormat.for_run(self.tokenizer, config.data).record_on(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.micro, self.accumulation = config.train.micro_batch_size, config.train.gradient_accumulation_steps
        self.state = TrainState()
        self.strategy: Strategy  # built in run(), on this worker's device
        self.eval_batches: list[dict] | None = None
        self.tick = time.perf_counter()  # the end of the last booked step (or of eval and checkpoint after it)
        # Sent with the first step of each attempt: where the workers run and what was built.
        self.first_report: dict[str, Any] = {}
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()

    def run(self) -> None:
        from raytune_it.train.strategies import make_strategy

        self.strategy = make_strategy(self.config, self.plan.total_steps, self.device)
        self.restore()
        self.first_report = {"worker_nodes": worker_nodes(), "strategy": self.strategy.describe(),
                             "train_split": self.splits["train"].describe()}
        self.train_split = self.splits["train"].reader()
        self.lengths = self.train_split.lengths
        while self.state.step < self.plan.total_steps:
            self.train_epoch()
            if self.state.step < self.plan.total_steps:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
        publish_export(self.strategy, self.tokenizer, self.export_location, self.rank)

    def restore(self) -> None:
        """Continue from the last checkpoint Ray Train recorded, if there is one: model, optimizer,
        schedule, data position and RNG."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            self.strategy.load_checkpoint(Path(folder))
            self.state = TrainState.load(Path(folder))
            load_rng_state(Path(folder), self.rank)
        self.state.restarts += 1

    def train_epoch(self) -> None:
        """The rest of the current epoch, from the data position, in the epoch's own order."""
        from raytune_it.train.data import epoch_rows, micro_batch_rows

        config, state = self.config, self.state
        order = epoch_rows(len(self.lengths), config.train.seed, state.epoch, self.rank, self.world_size,
                           self.train_split.group_rows, config.data.shuffle_window_row_groups)
        rows = micro_batch_rows(order, self.lengths, self.micro, drop_last=True,
                                group_by_length=config.data.group_by_length, seed=config.train.seed,
                                epoch=state.epoch)[state.batches_in_epoch:]
        steps = min(self.plan.total_steps - state.step,
                    self.plan.steps_per_epoch - state.batches_in_epoch // self.accumulation)
        step_rows = iter([rows[i * self.accumulation:(i + 1) * self.accumulation] for i in range(steps)])
        self.tick = time.perf_counter()
        # A CPU has finished a step when ``queue_step`` returns; a GPU has only queued it.
        run_steps(partial(self.queue_step, step_rows), self.finish_step, steps,
                  read_late=self.device.type == "cuda",
                  read_at_once=partial(self.is_eval_step_at, state.step + 1))

    def queue_step(self, step_rows: Iterator[list]) -> tuple[Any, float]:
        """One optimizer step over ``accumulation`` micro-batches, queued on the device."""
        from raytune_it.train.data import micro_batches

        rows = next(step_rows)
        batches = list(micro_batches(self.train_split, rows, self.pad_id, pin_memory=self.device.type == "cuda"))
        trained = global_trained_tokens(batches, self.device)
        loss_sum = self.strategy.backward(batches, trained)
        self.strategy.optimizer_step()
        tokens = int(sum(self.lengths[index] for chunk in rows for index in chunk))  # padding excluded
        return step_stats(loss_sum, trained, tokens, self.device), self.strategy.learning_rate()

    def finish_step(self, queued: tuple[Any, float]) -> None:
        """Book a finished step (its loss and tokens were on the device until now), evaluate and checkpoint
        when it is an eval step, and report it. Eval and checkpoint time is booked apart from training."""
        stats, learning_rate = queued
        loss, tokens = stats.tolist()  # waits for that step's work only; the next one is already queued
        now = time.perf_counter()
        seconds, self.tick = now - self.tick, now
        state = self.state
        state.step += 1
        state.batches_in_epoch += self.accumulation
        state.tokens += int(tokens)
        state.train_seconds += seconds
        metrics: StepMetrics = {
            "step": state.step, "epoch": state.epoch, "total_steps": self.plan.total_steps,
            "loss": loss, "learning_rate": learning_rate,
            "tokens": state.tokens, "tokens_per_second": tokens / seconds if seconds else 0.0,
            "train_seconds": state.train_seconds, "restarts": state.restarts,
        }
        at_eval = self.is_eval_step(state.step)
        if at_eval:
            started = time.perf_counter()
            metrics.update(self.evaluate())
            state.eval_seconds += time.perf_counter() - started
        metrics["eval_seconds"], metrics["checkpoint_seconds"] = state.eval_seconds, state.checkpoint_seconds
        self.report(metrics, with_checkpoint=at_eval)
        self.tick = time.perf_counter()

    def is_eval_step(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) evaluates and checkpoints."""
        return step % self.config.train.eval_every_steps == 0 or step == self.plan.total_steps

    def is_eval_step_at(self, first: int, index: int) -> bool:
        """Whether the ``index``-th step of a session that starts at step ``first`` evaluates."""
        return self.is_eval_step(first + index)

    def evaluate(self) -> StepMetrics:
        from raytune_it.train.data import eval_rows, micro_batch_rows, micro_batches

        if self.eval_batches is None:  # the eval split is small: collated once and kept
            split = self.splits.get("eval")
            table = split.table() if split is not None and split.rows else None
            self.eval_batches = [] if table is None else list(micro_batches(
                table, micro_batch_rows(eval_rows(table.num_rows, self.rank, self.world_size), None, self.micro,
                                        drop_last=False, group_by_length=False), self.pad_id))
        eval_loss = evaluate(self.strategy, self.eval_batches, self.device)
        [peak] = _all_reduce([float(peak_memory_bytes(self.device))], self.device, op="max")
        return {"eval_loss": eval_loss if eval_loss is not None else NO_EVAL, "peak_memory_bytes": int(peak)}

    def report(self, metrics: StepMetrics, with_checkpoint: bool) -> None:
        """Every step's metrics go to the driver's queue; Ray Train gets eval steps with a checkpoint.

        ``ray.train.report`` is a barrier that waits for the controller's next poll
        (every 2 s), so calling it every step would cap training at one step per poll.
        """
        if self.progress is not None and self.rank == 0:
            self.pending.append(dict(metrics, **self.first_report))
            self.first_report = {}
            # One queue call per second, not per step: each call is a round trip to the queue actor.
            if with_checkpoint or time.monotonic() - self.last_flush > 1.0 or metrics["step"] == self.plan.total_steps:
                try:
                    self.progress.put_nowait_batch(self.pending)
                except Exception:  # a full or gone progress queue must never stop training
                    pass
                self.pending.clear()
                self.last_flush = time.monotonic()
        if with_checkpoint:
            self.checkpoint(metrics)

    def checkpoint(self, metrics: StepMetrics) -> None:
        """Write a checkpoint and report it to Ray Train, which uploads it to the run's storage and records
        it once every worker has reported it: a restart uses the newest checkpoint so recorded."""
        import ray.train

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="raytune-it-ckpt-") as folder:
            # Every rank writes its RNG state; the strategy decides which ranks write model state.
            self.strategy.save_checkpoint(Path(folder))
            save_rng_state(Path(folder), self.rank)
            if self.rank == 0:
                self.state.save(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{self.state.step:07d}")
        # Writing and uploading; the next step's metrics carry it.
        self.state.checkpoint_seconds += time.perf_counter() - started


def publish_export(strategy: Any, tokenizer: Any, export: Any, rank: int) -> None:
    """Every rank takes part in the export (ZeRO-3 gathers its shards); rank 0 writes it to a local folder
    and publishes it to storage, so readers never see a half-written export, on any node."""
    from raytune_it.storage import publish_dir

    with tempfile.TemporaryDirectory(prefix="raytune-it-export-") as folder:
        strategy.export(Path(folder) / "export", tokenizer)
        if rank == 0:
            publish_dir(Path(folder) / "export", export)
