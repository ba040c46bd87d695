"""The training strategy protocol: what the loop needs from ZeRO-3 and from LoRA.

The loop (``raytune_it/train/loop.py``) is written once against this protocol;
each method is one small implementation of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from raytune_it.data.tokenize import IGNORE_INDEX, PAD_TO_MULTIPLE_OF


class Strategy(Protocol):
    def backward(self, micro_batches: Sequence[dict], trained_tokens: Any) -> Any:
        """Forward and backward over a step's micro-batches (gradient accumulation), queued on the device.

        The loss is the sum of every trained token's loss over ``trained_tokens``, the step's count over
        all micro-batches and all workers (``loop.global_trained_tokens``), so each token weighs the same
        however the batch is split. Returns this worker's summed token loss as a 0-dim tensor without
        waiting for it: reading it (a host sync) is the loop's choice, which does so one step later."""

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the schedule, and clear the gradients."""

    def eval_batch(self, batch: dict) -> tuple[float, int]:
        """Summed token loss and the number of trained tokens in one eval batch."""

    def learning_rate(self) -> float: ...

    def describe(self) -> dict[str, Any]:
        """Facts about the set-up as built (precision, sharding, parameter counts), for the summary."""

    def save_checkpoint(self, folder: Path) -> None:
        """Write this rank's part of a checkpoint into ``folder`` (a replica rank may write nothing)."""

    def load_checkpoint(self, folder: Path) -> None: ...

    def export(self, folder: Path, tokenizer: Any) -> None:
        """Write the tuned result in its ecosystem format (HF model dir or peft adapter)."""


def trained_tokens(labels: Any) -> int:
    """Tokens the loss covers: labels shifted by one, ignoring the masked ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model: Any, batch: dict, step_trained_tokens: Any, world_size: int) -> tuple[Any, Any]:
    """A micro-batch's share of the step's loss, to backpropagate, and its summed token loss, to report.

    The model's own loss function divides its summed token losses by ``num_items_in_batch`` (the
    transformers convention since 4.46). DDP and DeepSpeed average gradients over workers, so the share
    is multiplied by the world size: the gradient is then the sum over every worker's tokens divided by
    the step's global count."""
    loss = model(**batch, use_cache=False, num_items_in_batch=step_trained_tokens).loss
    return loss * world_size, loss.detach() * step_trained_tokens


def install_loss(model: Any, config: Any, device: Any, partitioned: bool) -> str:
    """Give the causal LM the loss ``train.loss_implementation`` chooses (``raytune_it/train/loss.py``)
    before anything wraps it, and name the one it got, for ``describe``."""
    from raytune_it.train import loss

    chosen = loss.choose(config.train.loss_implementation, model, device, partitioned)
    longest = -(-config.train.max_seq_len // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF  # as collate pads
    loss.install(model, chosen, config.train.loss_chunk_tokens, config.train.micro_batch_size * longest)
    return chosen


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def checkpointing_on(model: Any) -> bool:
    """Whether activation checkpointing is on.

    transformers 5.2x renamed ``is_gradient_checkpointing`` (now deprecated) to
    ``is_activation_checkpointing``; earlier 5.x releases, such as the 5.17 of a
    GPU image we ran on, have only the old name.
    """
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def enable_checkpointing(model: Any) -> None:
    """Turn activation checkpointing on (non-reentrant), by whichever name the installed
    transformers has: 5.2x's ``activation_checkpointing_enable`` or the older, now
    deprecated ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def to_device(batch: dict, device: Any) -> dict:
    """The batch on the training device; on a GPU the batch is in pinned memory, so the copy does not
    block the host."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def adamw(params: list, lr: float, weight_decay: float) -> Any:
    """torch's AdamW, fused where torch has the kernel (CPU and CUDA, floating-point tensors).

    The fused kernel updates every tensor in one pass instead of a dozen small ops
    per tensor: the same update, about 2.4x faster for the tiny model's LoRA
    tensors on the CPU, and the default of transformers' ``Trainer`` since torch 2.8.
    """
    import torch

    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_name(optimizer: Any) -> str:
    """The optimizer as built, such as 'AdamW (fused)': DeepSpeed's ZeRO wrapper is looked through."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return f"{type(inner).__name__}{' (fused)' if inner.defaults.get('fused') else ''}"


class StrategyBase:
    """What both strategies share. ``forward_model`` is what a forward pass runs: the DeepSpeed engine
    (ZeRO-3) or the DDP-wrapped peft model (LoRA); ``scheduler`` steps the learning rate."""

    device: Any
    forward_model: Any
    scheduler: Any

    def _to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    def eval_batch(self, batch: dict) -> tuple[float, int]:
        """The batch's summed loss over its trained tokens, and their count (the loop divides once)."""
        import torch

        self.forward_model.eval()
        with torch.no_grad():
            loss = self.forward_model(**self._to_device(batch), use_cache=False).loss
        tokens = trained_tokens(batch["labels"])
        return float(loss) * tokens, tokens

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
