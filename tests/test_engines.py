"""Engine selection, and the vLLM engine where it can run (a GPU and the vllm extra)."""

import importlib.util
import subprocess
import sys

import pytest

from raytune_it.serving.engines import engine_choice

HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and __import__("torch").cuda.is_available()


def test_auto_picks_transformers_without_a_gpu_and_never_imports_vllm():
    assert engine_choice("auto", use_gpu=False) == "transformers"
    assert engine_choice("transformers", use_gpu=True) == "transformers"
    code = ("import sys, raytune_it.serving.engines as e, raytune_it.serving.app; "
            "e.engine_choice('auto', True); print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_adapter_directories_are_checked(tmp_path):
    from raytune_it.serving.adapters import check_adapter_dir

    with pytest.raises(ValueError, match="not a peft adapter directory"):
        check_adapter_dir("med", str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only safetensors weights are loaded"):
        check_adapter_dir("med", str(tmp_path))


def test_adapter_names_are_validated():
    from raytune_it.config import load_config
    from raytune_it.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter name '../x' must be"):
        load_config("tiny-lora", ['serve.adapters={"../x": "/tmp"}'])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM_GPU, reason="the vLLM engine needs the vllm extra and a CUDA GPU; neither is here")
def test_vllm_engine_generates_with_the_same_usage_numbers():
    import asyncio

    from raytune_it.config import load_config
    from raytune_it.serving.engines import GenerationRequest, create_engine

    config = load_config("tiny-lora", ["serve.engine=vllm", "serve.use_gpu=true", "serve.model_name=tiny-llama"])
    engine = create_engine(config.serve.model_dump())
    result = asyncio.run(engine.generate(GenerationRequest(model="tiny-llama", prompt="Hello", max_tokens=8,
                                                           temperature=0, ignore_eos=True)))
    assert result.completion_tokens == 8 and result.tokens_per_second > 0
    assert 0 < result.time_to_first_token_s < result.latency_s
