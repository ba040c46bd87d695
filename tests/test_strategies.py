"""The pieces the two training strategies share: optimizer, DeepSpeed config, checkpointing flag."""

import copy

import pytest
import torch

from raytune_it.config import load_config
from raytune_it.train.strategies.base import adamw, checkpointing_on, enable_checkpointing
from raytune_it.train.strategies.zero3 import deepspeed_config


def _params(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 256), (256, 16), (7,)]]


def test_adamw_is_fused_on_the_cpu_and_makes_the_same_update_as_torch_default():
    fused_params, plain_params = _params(0), _params(0)
    fused = adamw(fused_params, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        grads = _params(100 + step)
        for group, optimizer in ((fused_params, fused), (plain_params, plain)):
            for param, grad in zip(group, grads):
                param.grad = grad.detach().clone()
            optimizer.step()
    for a, b, start in zip(fused_params, plain_params, _params(0)):
        assert not torch.equal(a, start), "the parameters moved"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_state_round_trips_for_resume():
    params = _params(1)
    optimizer = adamw(params, lr=1e-2, weight_decay=0.0)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = adamw(restored_params, lr=1e-2, weight_decay=0.0)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for group in (params, restored_params):
        for param in group:
            param.grad = torch.full_like(param, 0.5)
    optimizer.step()
    restored.step()
    for a, b in zip(params, restored_params):
        assert torch.equal(a, b), "a resumed optimizer continues bit for bit"


@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_config_uses_torch_fused_adamw_unless_offloading(use_gpu):
    config = load_config("tiny-full")
    optimizer = deepspeed_config(config, world_size=2, use_gpu=use_gpu)["optimizer"]
    # torch's fused AdamW on GPUs too: no CUDA extension to JIT-compile on each fresh worker.
    assert optimizer["type"] == "AdamW" and optimizer["params"]["torch_adam"] is True
    assert optimizer["params"]["fused"] is True
    offloaded = deepspeed_config(load_config("tiny-full", ["deepspeed.offload_optimizer=true"]), 2, use_gpu)
    assert "torch_adam" not in offloaded["optimizer"]["params"], "offloaded states use DeepSpeed's CPUAdam"
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_checkpointing_flag_reads_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert checkpointing_on(model) is False
    enable_checkpointing(model)
    assert checkpointing_on(model) is True


def test_checkpointing_flag_on_transformers_before_the_rename():
    class OlderModel:  # transformers 5.1x: only the old property exists
        is_gradient_checkpointing = True

    assert checkpointing_on(OlderModel()) is True
    OlderModel.is_gradient_checkpointing = False
    assert checkpointing_on(OlderModel()) is False


def test_enabling_checkpointing_on_transformers_before_the_rename():
    class OlderModel:  # transformers 5.1x: only gradient_checkpointing_enable exists
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    model = OlderModel()
    enable_checkpointing(model)
    assert model.kwargs == {"use_reentrant": False}


def _adapted(peft_model) -> set[str]:
    # names end in <module>.lora_A.default.weight
    return {name.split(".")[-4] for name, _ in peft_model.named_parameters() if ".lora_A." in name}


@pytest.mark.parametrize("targets,adapted", [
    ("[all-linear]", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("[q_proj, down_proj]", {"q_proj", "down_proj"}),
])
def test_the_lora_strategy_builds_the_adapter_the_config_names(tiny_model_dir, targets, adapted):
    """The peft model the LoRA strategy trains (``lora_model``, what ``LoraStrategy`` wraps) has the config's
    target modules, rank, alpha and dropout; lora.target_modules=[all-linear] is peft's shorthand for every
    linear layer but the head, which preflight accepts."""
    from raytune_it.train.preflight import preflight
    from raytune_it.train.strategies.lora import lora_model

    config = load_config("tiny-lora", [f"lora.target_modules={targets}", "lora.quantization=none", "lora.rank=4",
                                       "lora.alpha=12", "lora.dropout=0.25"])
    preflight(config)
    model = lora_model(config, torch.device("cpu"))
    assert _adapted(model) == adapted
    peft_config = model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (4, 12, 0.25)


def test_the_planner_counts_every_projection_for_all_linear():
    from raytune_it.plan.memory import LLAMA_SHAPES, lora_trainable_params

    shape = LLAMA_SHAPES["7B"]
    assert lora_trainable_params(shape, 16, ["all-linear"]) > lora_trainable_params(shape, 16, ["q_proj", "v_proj"])


@pytest.mark.parametrize("implementation", ["full", "chunked"])
def test_the_chunked_loss_never_keeps_the_full_logits_for_the_backward(tiny_model_dir, implementation):
    """What autograd keeps for the backward pass: with the model's own loss, logits for every token of the
    micro-batch ([tokens x vocab]); with the chunked loss, none: each chunk's gradients are computed in its
    forward (the fused way, as this plain head trains), so only the hidden states' and the head's gradients
    are kept. The loss and the gradients, the head's included, are the full loss's either way."""
    from transformers import AutoModelForCausalLM

    from raytune_it.train.strategies.base import install_loss

    config = load_config("tiny-lora", [f"train.loss_implementation={implementation}", "train.loss_chunk_tokens=32",
                                       "train.micro_batch_size=2", "train.max_seq_len=64"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert install_loss(model, config, torch.device("cpu"), partitioned=False) == implementation
    ids = torch.randint(10, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :20] = -100
    largest = 0  # elements of the largest saved tensor shaped like logits (its last dimension the vocabulary)

    def keep(tensor):
        nonlocal largest
        if tensor.dim() and tensor.shape[-1] == model.config.vocab_size:
            largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    loss.backward()
    expected = reference(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for (name, param), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-5, atol=1e-5 * float(want.grad.abs().max()),
                                   msg=name)
    vocab, tokens = model.config.vocab_size, ids.numel()
    if implementation == "full":
        assert largest >= tokens * vocab
    else:
        assert largest == 0, f"logits of {largest // vocab} tokens kept for the backward pass"


@pytest.mark.parametrize("head_trains", [True, False])
def test_the_fused_chunked_loss_gives_the_full_logits_loss_and_gradients(head_trains):
    """The fused way on its own (a head with a bias, chunks that do not divide the tokens, masked tokens, a
    frozen or a training head): the summed cross-entropy of the full logits and its gradients, for the
    states, the weight and the bias, to 1e-5."""
    from torch.nn import functional

    from raytune_it.train.loss import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 301, bias=True)
    head.requires_grad_(head_trains)
    states = torch.randn(2, 37, 24, generator=generator, requires_grad=True)
    labels = torch.randint(0, 301, (2, 37), generator=generator)
    labels[:, :9] = -100
    loss = linear_cross_entropy(states, head, labels, num_items_in_batch=torch.tensor(50), chunks=5)
    grads = torch.autograd.grad(loss, [states] + ([head.weight, head.bias] if head_trains else []))
    targets = functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    expected = functional.cross_entropy(head(states).reshape(-1, 301).float(), targets, reduction="sum",
                                        ignore_index=-100) / 50
    want = torch.autograd.grad(expected, [states] + ([head.weight, head.bias] if head_trains else []))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for got, reference in zip(grads, want):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_a_loss_the_run_cannot_use_is_refused_before_ray_starts(tmp_path, tiny_model_dir):
    """An explicit train.loss_implementation is checked against the model's class (read on the meta device)
    and the run's device and method, naming the key, before any worker loads the model."""
    from transformers import GPT2Config

    from raytune_it.errors import ConfigError
    from raytune_it.train.preflight import preflight

    gpt2 = tmp_path / "gpt2-shaped"  # a config.json alone, all the meta model needs (no weights: no path check)
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"train.loss_implementation=chunked: .*GPT2LMHeadModel.*auto or full"):
        preflight(load_config("tiny-full", [f"model.name_or_path={gpt2}", "train.loss_implementation=chunked"],
                              check_paths=False))
    preflight(load_config("tiny-full", [f"model.name_or_path={gpt2}", "train.loss_implementation=auto"],
                          check_paths=False))
    with pytest.raises(ConfigError, match=r"loss_implementation=liger: .*method=lora, scaling.use_gpu=false"):
        preflight(load_config("tiny-lora", ["train.loss_implementation=liger"]))
    with pytest.raises(ConfigError, match=r"loss_implementation=liger: .*method=full, scaling.use_gpu=true"):
        preflight(load_config("tiny-full", ["train.loss_implementation=liger", "scaling.use_gpu=true"]))
    preflight(load_config("tiny-lora", ["train.loss_implementation=chunked"]))
