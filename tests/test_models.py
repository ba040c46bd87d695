import json

import torch

from raytune_it.config import load_config
from raytune_it.models import tiny
from raytune_it.models.loading import load_causal_lm, load_tokenizer, resolve_model_path


def test_tiny_model_is_a_standard_hf_directory(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert resolve_model_path(tiny.TINY_NAME) == str(tiny_model_dir) == str(tiny.tiny_model_dir())


def test_tiny_model_reloads_by_path_and_generates(tiny_model_dir):
    # the same path a user passes for a real checkpoint: model.name_or_path=/path/to/dir
    config = load_config("tiny-lora", [f"model.name_or_path={tiny_model_dir}"])
    tokenizer = load_tokenizer(config.model.name_or_path)
    model = load_causal_lm(config.model.name_or_path).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < params < 20_000_000
    inputs = tokenizer("### Instruction:\nConvert 3 hours to minutes.\n\n### Response:\n", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]), str)
    # bf16 loading, as full tuning uses
    assert load_causal_lm(str(tiny_model_dir), precision="bfloat16").dtype == torch.bfloat16


def test_tiny_build_is_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    rebuilt = tiny.build_tiny_model(tmp_path / "again")
    assert (rebuilt / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    a, b = load_file(rebuilt / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
