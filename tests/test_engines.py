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


#: Words with multi-byte characters (2, 3 and 4 UTF-8 bytes) and a blank line, repeated into a long answer.
WORDS = ["Convert", " 2 hours", " to minutes:", " 120.", " Größe", " 東京", " 🙂", "\n\n", " ok"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mistral"])
def test_incremental_decoding_gives_the_whole_decode_and_cuts_at_the_first_stop(family):
    """Byte-level BPE (tiny-llama) and SentencePiece-style (tiny-mistral): the scanner's text, streamed
    token by token, is the whole answer's decode; a stop string ends it at the first token that completes
    it, cut where the whole decode first holds it."""
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.models.tiny import ensure_tiny_model
    from raytune_it.serving.engines.base import StopScanner

    tokenizer = load_tokenizer(str(ensure_tiny_model(family)))
    tokens = tokenizer.encode("".join(WORDS[i % len(WORDS)] for i in range(200)), add_special_tokens=False)
    scanner, streamed = StopScanner(tokenizer, []), ""
    for count in range(1, len(tokens) + 1):
        streamed += scanner.update(tokens[:count])
    streamed += scanner.finish()
    assert streamed == scanner.text == tokenizer.decode(tokens, skip_special_tokens=True)

    stop = "\n\n okConv"
    scanner, count = StopScanner(tokenizer, [stop]), 0
    for token in tokens:
        scanner.push(token)
        count += 1
        if scanner.stopped:
            break
    whole = tokenizer.decode(tokens[:count], skip_special_tokens=True)
    assert scanner.stopped and scanner.text == whole[:whole.index(stop)]
    assert stop not in tokenizer.decode(tokens[:count - 1], skip_special_tokens=True), "the first token that ends it"


def test_a_slow_tokenizers_answer_is_decoded_in_linear_work():
    """A tokenizer without a fast backend goes through the scanner's own decode window: the same text as
    one decode of the whole answer, with the tokens decoded in all growing linearly with the answer's
    length (decoding every token so far at each token, as before, is quadratic: n²/2)."""
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.models.tiny import ensure_tiny_model
    from raytune_it.serving.engines.base import StopScanner

    tokenizer = load_tokenizer(str(ensure_tiny_model()))
    decoded = {"tokens": 0}

    class Slow:  # the tokenizer's decode, without ``backend_tokenizer``
        def decode(self, ids, skip_special_tokens=True):
            decoded["tokens"] += len(ids)
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    tokens = tokenizer.encode("".join(WORDS[i % len(WORDS)] for i in range(600)), add_special_tokens=False)
    scanner, streamed = StopScanner(Slow(), ["never said"]), ""
    for count in range(1, len(tokens) + 1):
        streamed += scanner.update(tokens[:count])
    while_generating = decoded["tokens"]
    streamed += scanner.finish()
    assert streamed == tokenizer.decode(tokens, skip_special_tokens=True)
    assert while_generating <= 12 * len(tokens), f"{while_generating} tokens decoded for {len(tokens)}"


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
