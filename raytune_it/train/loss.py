"""The training loss without the full logits.

A causal LM's own forward builds ``[tokens x vocab]`` logits, upcasts them to fp32 for the cross-entropy
and keeps them for the backward pass: at LLaMA-3's vocabulary (128,256) and 4 x 512 tokens that is about
1 GB, the same again for its gradient, plus the bf16 copy, for every micro-batch. Here the decoder's
hidden states go through the output head a chunk of tokens at a time, and only for the tokens the loss
Each chunk's head matmul and cross-entropy run under activation checkpointing, so the backward pass
recomputes one chunk's logits at a time instead of keeping them all: the peak is one chunk's logits,
``loss_chunk_tokens x vocab``. Masked tokens (the prompt) are chunked too, not dropped: selecting the
trained ones would cost a host sync per micro-batch on a GPU and give every batch a different shape.

On CUDA, Liger's fused linear cross-entropy does the same in Triton kernels where ``liger-kernel`` is
installed (the ``liger`` extra), for LoRA: under ZeRO-3 the head's weight is a partitioned parameter
that only the head's own forward gathers, which the chunked path calls and Liger's kernel does not.

The loss is the model's own (``transformers.loss.loss_utils.ForCausalLMLoss``): the summed token
cross-entropy over ``num_items_in_batch`` when it is given, else the mean; so the loop's normalisation
over micro-batches and workers is unchanged. It is installed on the model instance's ``forward``, under
whatever wraps it (peft, DDP, DeepSpeed's engine), as Liger patches transformers' models.
"""

from __future__ import annotations

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
                                    fused=implementation == "liger")
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


def linear_cross_entropy(hidden: Any, head: Any, labels: Any, num_items_in_batch: Any = None,
                         chunks: int = 8, fused: bool = False) -> Any:
    """``ForCausalLMLoss(head(hidden), labels)`` without ever holding the logits of more than one of
    ``chunks`` equal chunks of the tokens: labels are shifted by one, and each chunk's logits are
    recomputed in the backward pass rather than kept."""
    import torch
    from torch.nn import functional
    from torch.utils.checkpoint import checkpoint

    targets = functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    states = hidden.reshape(-1, hidden.shape[-1])
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, states, targets, head.bias)
    else:
        def chunk_loss(chunk_states: Any, chunk_targets: Any) -> Any:
            return functional.cross_entropy(head(chunk_states).float(), chunk_targets, reduction="sum",
                                            ignore_index=IGNORE_INDEX)

        total = sum(checkpoint(chunk_loss, chunk_states, chunk_targets, use_reentrant=False)
                    for chunk_states, chunk_targets in zip(torch.tensor_split(states, chunks),
                                                           torch.tensor_split(targets, chunks)))
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch

