"""Engine selection and what both engines share: stop strings, errors, adapter checks."""

import subprocess
import sys

import pytest

from raytune_it.serving.engines import engine_choice


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


def test_a_stream_never_shows_what_a_stop_string_removes():
    from raytune_it.serving.engines.base import StopScanner

    class CharTokenizer:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    text = "the answer is 42. END of it"
    scanner, streamed = StopScanner(CharTokenizer(), ["END", "\n\n"]), ""
    for n in range(1, len(text) + 1):
        streamed += scanner.update([ord(c) for c in text[:n]])
        assert not streamed.endswith(("E", "EN")), "a possible start of a stop string is held back"
        if scanner.stopped:
            break
    streamed += scanner.finish()
    assert streamed == scanner.text == "the answer is 42. "


def test_engine_errors_keep_their_status_across_processes():
    import pickle

    from raytune_it.serving.engines.base import EngineError

    error = pickle.loads(pickle.dumps(EngineError("no such model", status=404, code="model_not_found", param="model")))
    assert (str(error), error.status, error.code, error.param) == ("no such model", 404, "model_not_found", "model")


def test_adapters_are_checked_against_the_base_and_the_rank(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    from helpers import train_tiny_adapter
    from raytune_it.serving.adapters import check_adapter, read_base_config
    from raytune_it.serving.engines.base import EngineError

    base = read_base_config(str(tiny_model_dir))
    adapter = train_tiny_adapter(tmp_path / "a", ["dosage"], steps=1, rank=16)
    assert check_adapter("a", adapter, base, max_rank=16)["r"] == 16
    with pytest.raises(EngineError, match="rank 16, above this deployment's maximum LoRA rank 8"):
        check_adapter("a", adapter, base, max_rank=8)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: torch.cat([t, t]) if "lora_B" in k else t for k, t in weights.items()},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(EngineError, match="does not fit the base model: .*lora_B.* has shape") as refused:
        check_adapter("a", adapter, base, max_rank=None)
    assert refused.value.status == 400 and refused.value.code == "invalid_adapter"


def test_vllm_gets_the_smallest_lora_rank_slot_that_holds_the_adapters():
    from raytune_it.serving.engines.base import EngineError
    from raytune_it.serving.engines.vllm_engine import supported_rank  # importable without vLLM

    assert [supported_rank(r) for r in (4, 8, 16, 17, 128, 200)] == [8, 8, 16, 32, 128, 256]
    with pytest.raises(EngineError):
        supported_rank(1024)
