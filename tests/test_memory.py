"""The first-principles memory model that sweeps and train's pre-launch warning use."""

import json

import pytest

from raytune_it.config import load_config
from raytune_it.hardware import SERVER_TYPES
from raytune_it.plan.memory import GIB, LLAMA_SHAPES, estimate_memory, shape_from_hf_config
from raytune_it.train.driver import memory_warning


def smallest_fit(size: str, batch: int) -> int:
    budget = SERVER_TYPES["a800-80g"].gpu_memory_gib * GIB
    for gpus in (1, 2, 4, 8, 16, 24, 32):
        if estimate_memory(LLAMA_SHAPES[size], method="full", num_gpus=gpus, micro_batch=batch,
                           seq_len=512).total <= budget:
            return gpus
    raise AssertionError("nothing fits")


@pytest.mark.parametrize("size,batch,gpus", [("7B", 8, 2), ("13B", 8, 4), ("30B", 4, 8), ("65B", 2, 16)])
def test_survey_full_tuning_gpu_counts_come_out(size, batch, gpus):
    # Table 8's full-tuning column on A800-80G, from first principles (no special cases)
    assert smallest_fit(size, batch) == gpus


def test_parameter_counts_match_llama():
    assert LLAMA_SHAPES["7B"].parameters == pytest.approx(6.74e9, rel=0.01)
    assert LLAMA_SHAPES["65B"].parameters == pytest.approx(65.2e9, rel=0.01)


def test_lora_int8_fits_one_80g_gpu_up_to_30b_and_checkpointing_saves_memory():
    budget = 80 * GIB
    for size in ("7B", "13B", "30B"):
        assert estimate_memory(LLAMA_SHAPES[size], method="lora", num_gpus=1, micro_batch=4, seq_len=512).total < budget
    shape = LLAMA_SHAPES["7B"]
    with_gc = estimate_memory(shape, method="full", num_gpus=2, micro_batch=8, seq_len=512, checkpointing=True)
    without = estimate_memory(shape, method="full", num_gpus=2, micro_batch=8, seq_len=512, checkpointing=False)
    assert with_gc.activations < without.activations / 5


def test_train_warns_before_launch_when_a_config_cannot_fit(tmp_path):
    model = tmp_path / "llama-7b"
    model.mkdir()
    shape = LLAMA_SHAPES["7B"]
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": shape.layers, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_attention_heads": shape.heads, "vocab_size": shape.vocab}))
    assert shape_from_hf_config(model).parameters == shape.parameters
    # (a config.json alone: no weights to pass load_config's path checks, all the estimate reads)
    one = load_config("llama-7b-full-a800", [f"model.name_or_path={model}", "data.path=builtin:tasks",
                                             "scaling.num_workers=1"], check_paths=False)
    warning = memory_warning(one)
    assert warning and "more than a a800-80g GPU's 80 GiB" in warning and "optimizer" in warning
    two = load_config("llama-7b-full-a800", [f"model.name_or_path={model}", "data.path=builtin:tasks"],
                      check_paths=False)
    assert memory_warning(two) is None


def test_one_shape_derivation_honours_head_dim_for_the_planner_and_the_adapter_checks():
    """A model whose heads are not hidden/heads wide (head_dim set, as in Gemma or Qwen3): the planner's
    parameter count and serving's adapter shapes come from the same module shapes."""
    from raytune_it.models.shape import shape_from_hf_dict
    from raytune_it.serving.adapters import expected_lora_shapes

    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100}
    shape = shape_from_hf_dict(config, "wide-heads")
    assert expected_lora_shapes(config) == shape.module_shapes()
    assert shape.module_shapes()["q_proj"] == (64, 128) and shape.module_shapes()["k_proj"] == (64, 64)
    per_layer = 64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 128
    assert shape.linear_params_per_layer == per_layer
