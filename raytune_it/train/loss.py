"""The training loss without the full logits.

A causal LM's own forward builds ``[tokens x vocab]`` logits, upcasts them to fp32 for the cross-entropy
and keeps them for the backward pass: at LLaMA-3's vocabulary (128,256) and 4 x 512 tokens that is about
1 GB, the same again for its gradient, plus the bf16 copy, for every micro-batch. Here the decoder's
hidden states go through the output head a chunk of tokens at a time, so at most one chunk's logits,
``loss_chunk_tokens x vocab``, exist at once. Masked tokens (the prompt) are chunked too, not dropped:
selecting the trained ones would cost a host sync per micro-batch on a GPU and give every batch a
different shape.

Two ways, both exact:

- **Fused** (a plain head, as LoRA's frozen one): each chunk's forward computes its loss and, at once, its
  gradient with respect to the hidden states (and the head's weight if it trains), as Liger's fused
  linear cross-entropy does; the backward pass only scales them. No logits are kept or recomputed, so it
  does the full loss's matmuls and no more.
- **Recomputed** (a head that is not a plain ``nn.Linear``, or a ZeRO-3 partitioned one, whose weight
  only the head module's own forward gathers): each chunk's head call and cross-entropy run under
  activation checkpointing, and the backward pass recomputes that chunk's logits: one more head matmul.

On CUDA, Liger's fused linear cross-entropy does the fused way in Triton kernels where ``liger-kernel``
is installed (the ``liger`` extra), for LoRA.

The loss is the model's own (``transformers.loss.loss_utils.ForCausalLMLoss``): the summed token
cross-entropy over ``num_items_in_batch`` when it is given, else the mean; so the loop's normalisation
over micro-batches and workers is unchanged. It is installed on the model instance's ``forward``, under
whatever wraps it (peft, DDP, DeepSpeed's engine), as Liger patches transformers' models.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any

from raytune_it.data.tokenize import IGNORE_INDEX

#: Causal LMs whose logits are exactly ``lm_head(final hidden states)``: no logit scaling or soft-capping
#: (Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling`` would
#: change the loss). Any other architecture keeps its own forward under ``auto``.
PLAIN_HEAD_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
})


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def choose(implementation: str, model: Any, device: Any, partitioned: bool) -> str:
    """The loss a run uses: ``auto`` takes Liger on CUDA where it is installed and the head is not
    partitioned, else the chunked loss where the architecture allows it, else the model's own."""
    architecture = type(model).__name__
    if implementation == "full":
        return "full"
    plain = architecture in PLAIN_HEAD_ARCHITECTURES
    if implementation in ("chunked", "liger") and not plain:
        raise ValueError(
            f"train.loss_implementation={implementation} needs logits that are the output head of the final "
            f"hidden states; {architecture} is not known to compute them so (known: "
            f"{', '.join(sorted(PLAIN_HEAD_ARCHITECTURES))}). Use train.loss_implementation=full or auto.")
    if implementation == "liger":
        if device.type != "cuda" or not liger_available() or partitioned:
            raise ValueError("train.loss_implementation=liger needs a CUDA device, liger-kernel installed "
                             "(pip install 'raytune-it[liger]') and LoRA (ZeRO-3 partitions the head); "
                             "use train.loss_implementation=chunked or auto")
        return "liger"
    if not plain:
        return "full"
    if device.type == "cuda" and liger_available() and not partitioned:
        return "liger"
    return "chunked"


def install(model: Any, implementation: str, chunk_tokens: int, max_tokens: int) -> None:
    """Make ``model``'s forward compute its loss with ``implementation`` (``chunked`` or ``liger``) when
    it is given labels; without labels it is the model's own forward. ``full`` leaves the model as is.

    Every micro-batch is cut into the same number of chunks, enough for ``max_tokens`` (the largest
    micro-batch: micro_batch_size x max_seq_len) in chunks of at most ``chunk_tokens``: under ZeRO-3 each
    chunk's head call gathers the head's weight, a collective that every rank must make as often as the
    others, whatever its own batch's length."""
    if implementation == "full":
        return
    chunks = max(1, math.ceil(max_tokens / chunk_tokens))
    own_forward = model.forward

    def forward(self: Any, input_ids: Any = None, attention_mask: Any = None, labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        loss = linear_cross_entropy(hidden, self.lm_head, labels, num_items_in_batch, chunks,
                                    liger=implementation == "liger")
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


def linear_cross_entropy(hidden: Any, head: Any, labels: Any, num_items_in_batch: Any = None,
                         chunks: int = 8, liger: bool = False) -> Any:
    """``ForCausalLMLoss(head(hidden), labels)`` without ever holding the logits of more than one of
    ``chunks`` equal chunks of the tokens (labels are shifted by one): fused where the head is a plain
    linear layer, else recomputed (the module docstring says why)."""
    import torch
    from torch.nn import functional

    targets = functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    states = hidden.reshape(-1, hidden.shape[-1])
    if liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, states, targets, head.bias)
    elif type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id"):  # ds_id: a ZeRO-3 partition
        total = _fused_function().apply(states, head.weight, head.bias, targets, chunks)
    else:
        total = _recomputed_loss(states, head, targets, chunks)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _recomputed_loss(states: Any, head: Any, targets: Any, chunks: int) -> Any:
    import torch
    from torch.nn import functional
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(chunk_states: Any, chunk_targets: Any) -> Any:
        return functional.cross_entropy(head(chunk_states).float(), chunk_targets, reduction="sum",
                                        ignore_index=IGNORE_INDEX)

    return sum(checkpoint(chunk_loss, chunk_states, chunk_targets, use_reentrant=False)
               for chunk_states, chunk_targets in zip(torch.tensor_split(states, chunks),
                                                      torch.tensor_split(targets, chunks)))


@functools.cache
def _fused_function() -> Any:
    """The autograd function, built once torch is wanted (this module imports it lazily)."""
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """The summed cross-entropy of ``states @ weight.T + bias`` against ``targets``, chunk by chunk, with
        its gradients computed in the forward pass: a chunk's logits (fp32, as the model's own loss upcasts
        them) become its softmax in place, less one at each target, and that gradient of the logits is
        multiplied back into the gradient of the chunk's states (and accumulated into the weight's and the
        bias's when they train) before the next chunk. The backward pass scales what was saved."""

        @staticmethod
        def forward(ctx: Any, states: Any, weight: Any, bias: Any, targets: Any, chunks: int) -> Any:
            needs_states, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            needs_bias = bias is not None and ctx.needs_input_grad[2]
            total = torch.zeros((), dtype=torch.float32, device=states.device)
            grad_states = torch.empty_like(states) if needs_states else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
            for start, end in _chunk_bounds(states.shape[0], chunks):
                chunk, chunk_targets = states[start:end], targets[start:end]
                logits = torch.nn.functional.linear(chunk, weight, bias).float()
                trained = chunk_targets != IGNORE_INDEX
                picked = chunk_targets.clamp(min=0).unsqueeze(1)
                log_norm = torch.logsumexp(logits, dim=-1)
                total += ((log_norm - logits.gather(1, picked).squeeze(1)) * trained).sum()
                if not (needs_states or needs_weight or needs_bias):
                    continue
                grad = logits.sub_(log_norm.unsqueeze(1)).exp_()  # the softmax, in the logits' place
                grad.scatter_add_(1, picked, -torch.ones_like(picked, dtype=grad.dtype))
                grad.mul_(trained.unsqueeze(1))
                if grad_states is not None:
                    grad_states[start:end] = (grad.to(weight.dtype) @ weight).to(states.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t(), chunk.float())
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            ctx.save_for_backward(grad_states, grad_weight, grad_bias)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            grad_states, grad_weight, grad_bias = ctx.saved_tensors
            weight_dtype, bias_dtype = ctx.dtypes
            scale = grad_total.float()
            return (None if grad_states is None else grad_states * scale.to(grad_states.dtype),
                    None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
                    None if grad_bias is None else (grad_bias * scale).to(bias_dtype), None, None)

    return FusedLinearCrossEntropy


def _chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """``torch.tensor_split``'s chunks as (start, end) rows, computed on the host: no device sync."""
    size, extra = divmod(rows, chunks)
    bounds, start = [], 0
    for index in range(chunks):
        end = start + size + (index < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds
