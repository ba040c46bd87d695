"""Every trained token weighs the same in a step's loss, however the step's sequences are split into
micro-batches and workers: the gradients of gradient accumulation 4 x batch 1, of batch 4, and of 2 workers
with 2 sequences each are the same, for both strategies, on sequences whose responses differ in length.
The splits use the chunked loss (``raytune_it/train/loss.py``, in chunks of 16 tokens so each sequence
spans several); the reference is the model's own loss over the full logits, which the chunked loss
matches to 1e-5 on the same batch.

Averaging per-micro-batch mean losses (what raytune-it did before) gives a short response the weight of
a long one, and these gradients would then differ by far more than rounding."""

import numpy as np
import pytest
import torch

from raytune_it.data.tokenize import IGNORE_INDEX

pytestmark = pytest.mark.integration

#: (prompt tokens, response tokens) of the four sequences of the step.
SHAPES = [(12, 4), (6, 90), (30, 17), (9, 41)]


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for prompt, response in SHAPES:
        ids = rng.integers(10, 500, prompt + response).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _gradients_worker(loop_config):
    """One step's gradients, before the optimizer steps, for each method in turn; rank 0 saves them."""
    import deepspeed.utils
    import ray.train
    import ray.train.torch

    from raytune_it.config import load_config
    from raytune_it.data.tokenize import collate
    from raytune_it.train.loop import global_trained_tokens
    from raytune_it.train.strategies import make_strategy

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    rows = [loop_config["rows"][i] for i in loop_config["rows_of_rank"][rank]]
    micro = loop_config["micro"]
    batches = [collate(rows[i:i + micro], pad_token_id=0) for i in range(0, len(rows), micro)]
    found = {}
    for method in ("lora", "full"):
        for loss in loop_config["losses"]:
            config = load_config(f"tiny-{method}", loop_config["overrides"] + [
                f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={len(batches)}",
                f"train.loss_implementation={loss}", "train.loss_chunk_tokens=16"])
            torch.manual_seed(0)
            strategy = make_strategy(config, 10, device)
            assert strategy.describe()["loss"] == loss
            if method == "lora":
                # lora.quantization=none keeps a 16-bit (bf16) base, whose rounding follows each batch's
                # padded shape (1% of a gradient's scale on some CPUs); in float32 the splits differ only in
                # float32 rounding. The adapter is float32 already, so DDP's buckets are unchanged.
                strategy.peft_model.float()
                _same_lora_start(strategy.peft_model)
            strategy.backward(batches, global_trained_tokens(batches, device))
            if method == "lora":
                grads = {name: p.grad.detach().clone() for name, p in strategy.peft_model.named_parameters()
                         if p.requires_grad}
            else:
                grads = {name: deepspeed.utils.safe_get_full_grad(p).detach().clone()
                         for name, p in strategy.engine.module.named_parameters()}
            found[method, loss] = grads
    if rank == 0:
        torch.save(found, loop_config["out"])


def _same_lora_start(peft_model):
    """Give LoRA's A matrices the same values in every run from a generator of their own: the global seed
    alone does not fix them, since loading the model may draw from the global generator (CI once saw every
    lora_B gradient differ between two runs). B stays at zero, as peft starts it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _gradients(tmp_path, name, micro, rows_of_rank, losses=("chunked",)):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / f"{name}.pt"
    TorchTrainer(
        _gradients_worker,
        train_loop_config={"rows": _rows(), "micro": micro, "rows_of_rank": rows_of_rank, "out": str(out),
                           "losses": losses,
                           # float32 everywhere and no dropout: the splits differ only in rounding.
                           "overrides": ["lora.quantization=none", "lora.dropout=0", "deepspeed.bf16=false",
                                         "train.max_grad_norm=1000"]},
        scaling_config=ScalingConfig(num_workers=len(rows_of_rank)),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "ray")),
    ).fit()
    return torch.load(out)


def test_accumulation_and_workers_give_the_gradients_of_one_big_batch(tmp_path, tiny_model_dir):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    ray.init(num_cpus=2)
    try:
        accumulated = _gradients(tmp_path, "accumulation", micro=1, rows_of_rank=[[0, 1, 2, 3]])
        one_batch = _gradients(tmp_path, "batch", micro=4, rows_of_rank=[[0, 1, 2, 3]], losses=("full", "chunked"))
        two_workers = _gradients(tmp_path, "workers", micro=2, rows_of_rank=[[0, 1], [2, 3]])
    finally:
        ray.shutdown()
    for method in ("lora", "full"):
        # The reference: the model's own loss over the full logits, in one batch.
        reference = one_batch[method, "full"]
        # (LoRA's A matrices get no gradient at the first step: B starts at zero.)
        assert sum(int((g != 0).sum()) for g in reference.values()) > 1000
        for param, grad in reference.items():
            # To 1e-5 of each tensor's scale: summing a gradient chunk by chunk rounds differently in float32.
            torch.testing.assert_close(one_batch[method, "chunked"][param], grad, rtol=1e-5,
                                       atol=1e-5 * float(grad.abs().max()),
                                       msg=f"{method}, the chunked loss against the full logits' loss: {param}")
        for name, other in (("accumulation 4 x batch 1", accumulated), ("2 workers x batch 2", two_workers)):
            for param, grad in reference.items():
                torch.testing.assert_close(other[method, "chunked"][param], grad, rtol=2e-4, atol=1e-7,
                                           msg=f"{method}, {name}: {param}")
