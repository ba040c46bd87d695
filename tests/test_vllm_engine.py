"""The vLLM engine against the transformers engine, in-process, on a model whose greedy answers end with EOS.

The tiny model never picks EOS by itself, so the test makes a copy that does: EOS's output row becomes a
copy of a token T's row scaled by 1.001, so greedy decoding ends with EOS exactly where it would have
produced T. Both engines must then stop at the same place, leave EOS out of the text and count it.
"""

import asyncio
import subprocess
import sys

import pytest

from raytune_it.config import load_config

PROMPTS = ["### Instruction:\nWhat is the total dose for 40 kg at 5 mg per kg?\n\n### Response:\n",
           "### Instruction:\nConvert 4 hours to minutes.\n\n### Response:\n", "Hello"]


def test_each_engine_imports_without_the_other():
    code = ("import sys, raytune_it.serving.engines.vllm_engine, raytune_it.serving.app; "
            "print('raytune_it.serving.engines.transformers_engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def model_that_stops(folder, tiny_model_dir):
    """A copy of the tiny model whose greedy answer to PROMPTS[0] ends with EOS where the first token it had
    not produced before its sixth would come; returns the folder and that answer's length, EOS included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    position, target = next((i, t) for i, t in enumerate(greedy) if i >= 5 and t not in greedy[:i])
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[target] * 1.001
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder, position + 1


@pytest.mark.vllm
def test_both_engines_stop_at_eos_in_the_same_place_and_count_it(tmp_path, tiny_model_dir):
    from raytune_it.serving.engines import create_engine
    from raytune_it.serving.engines.base import GenerationRequest

    folder, length = model_that_stops(tmp_path / "stops", tiny_model_dir)
    base = str(folder)
    options = ["serve.max_model_len=256", "serve.enforce_eager=true", "serve.kv_cache_gib=0.25"]

    batched = {}

    async def run():
        results = {}
        for engine_name in ("transformers", "vllm"):
            config = load_config("tiny-lora", [*options, f"serve.engine={engine_name}"]).serve
            engine = create_engine(config, base, "stops", None)
            if engine_name == "vllm":
                assert engine.engine.vllm_config.lora_config is None, "no adapters: vLLM without its LoRA layers"
            try:
                results[engine_name] = [
                    await engine.generate(GenerationRequest(model="stops", prompt=p, max_tokens=24, temperature=0,
                                                            ignore_eos=ignore))
                    for p in PROMPTS for ignore in (False, True)]
                # A batch (eval's and generate's path) answers each prompt as it is answered alone.
                batched[engine_name] = await engine.generate_batch(
                    [GenerationRequest(model="stops", prompt=p, max_tokens=24, temperature=0) for p in PROMPTS])
            finally:
                engine.shutdown()
        return results

    results = asyncio.run(run())
    for ours, theirs in zip(results["transformers"], results["vllm"], strict=True):
        assert (ours.text, ours.finish_reason, ours.completion_tokens, ours.prompt_tokens) == (
            theirs.text, theirs.finish_reason, theirs.completion_tokens, theirs.prompt_tokens)
    stopped = results["vllm"][0]
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == length, "EOS ends it, and is counted"
    assert "</s>" not in stopped.text
    assert results["vllm"][1].completion_tokens == 24, "ignore_eos generates exactly max_tokens"
    for engine_name, answers in batched.items():
        alone = results[engine_name][::2]  # the same prompts without ignore_eos
        assert [(r.text, r.completion_tokens, r.finish_reason) for r in answers] == [
            (r.text, r.completion_tokens, r.finish_reason) for r in alone], engine_name


def decodable_copy(folder, model_dir):
    """A copy of a tiny model whose head never picks an id its tokenizer cannot decode. LLaMA-3- and
    Qwen2-shaped models have more ids than their tokenizer (as the real ones reserve ids), and a random
    head picks those often, which both engines decode as nothing; zero logits for them leave the real
    tokens' random ones to win, so the answers are text the engines can be compared on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["tiny-llama3", "tiny-qwen2", "tiny-mistral"])
def test_today_s_families_generate_the_same_tokens_in_both_engines(family, tmp_path):
    """LLaMA-3 (grouped-query attention, large vocabulary), Qwen2 (biased q/k/v) and Mistral (sliding window)
    shapes load in vLLM and decode greedily token for token as transformers does."""
    from raytune_it.models.tiny import ensure_tiny_model
    from raytune_it.serving.engines import create_engine
    from raytune_it.serving.engines.base import GenerationRequest

    base = str(decodable_copy(tmp_path / family, ensure_tiny_model(family)))
    options = ["serve.max_model_len=256", "serve.enforce_eager=true", "serve.kv_cache_gib=0.25"]

    async def run():
        results = {}
        for engine_name in ("transformers", "vllm"):
            config = load_config("tiny-lora", [*options, f"serve.engine={engine_name}"]).serve
            engine = create_engine(config, base, family, 8)
            try:
                results[engine_name] = [
                    await engine.generate(GenerationRequest(model=family, prompt=p, max_tokens=12, temperature=0,
                                                            ignore_eos=True))
                    for p in PROMPTS]
            finally:
                engine.shutdown()
        return results

    results = asyncio.run(run())
    for ours, theirs in zip(results["transformers"], results["vllm"], strict=True):
        assert (ours.text, ours.completion_tokens, ours.prompt_tokens) == (
            theirs.text, theirs.completion_tokens, theirs.prompt_tokens)
        assert theirs.completion_tokens == 12 and theirs.text


def test_vllm_cpu_threads_take_the_process_s_cpus_and_leave_ray_s_share_to_the_os():
    from raytune_it.serving.engines.vllm_engine import cpu_threads

    assert cpu_threads({}, [0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1"}, "a small machine keeps every core"
    assert cpu_threads({}, list(range(8))) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3,4,5,6"}, "one for the scheduler"
    assert cpu_threads({"OMP_NUM_THREADS": "2"}, list(range(8))) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, \
        "a Ray actor's share: unbound threads, so actors on one node do not pin the same cores"
    assert cpu_threads({"OMP_NUM_THREADS": "8"}, list(range(8)))["VLLM_CPU_OMP_THREADS_BIND"] != "nobind"
    assert cpu_threads({"VLLM_CPU_OMP_THREADS_BIND": "0-3"}, list(range(8))) == {}, "the user's choice stands"


def test_an_engine_is_asked_for_the_rank_and_modules_of_the_adapters_on_its_weights(tmp_path):
    import json

    from raytune_it.generation.answers import AdapterNeeds, ModelEntry, adapter_needs

    def adapter(name, rank, targets):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": targets}))
        return str(folder)

    models = [ModelEntry("base", "/w/base", None), ModelEntry("a", "/w/base", adapter("a", 8, ["q_proj", "v_proj"])),
              ModelEntry("b", "/w/base", adapter("b", 16, ["o_proj", "q_proj"])), ModelEntry("full", "/w/full", None)]
    assert adapter_needs(models) == {"/w/base": AdapterNeeds(16, ("o_proj", "q_proj", "v_proj"))}
    models.append(ModelEntry("c", "/w/base", adapter("c", 4, ".*attn.*")))  # peft's pattern form: any module
    assert adapter_needs(models) == {"/w/base": AdapterNeeds(16, None)}


@pytest.mark.vllm
def test_eval_and_generate_s_vllm_engine_runs_only_what_their_adapters_need_and_answers_as_transformers(tmp_path):
    """The Answerer (eval's and generate's path) starts vLLM with the adapters' largest rank and only the
    modules they touch (an engine without adapters runs without LoRA: the EOS test above), and every model's
    answers equal the transformers engine's, greedy, token for token."""
    from helpers import train_tiny_adapter
    from raytune_it.data.synthetic import generate
    from raytune_it.generation.answers import Answerer, Sampling, resolve_models

    models = {"base": "tiny-llama",
              "attention": str(train_tiny_adapter(tmp_path / "a", ["dosage"], steps=6, rank=8)),
              "mlp": str(train_tiny_adapter(tmp_path / "m", ["bmi"], steps=6, rank=16, targets=("down_proj",)))}
    records = list(generate(6, seed=5))
    answers, started = {}, None
    for engine_name in ("transformers", "vllm"):
        config = load_config("tiny-lora", [f"serve.engine={engine_name}", "serve.max_model_len=256",
                                           "serve.kv_cache_gib=0.25", "serve.enforce_eager=true"])
        entries = resolve_models("tiny-llama", models, "eval.models")
        answerer = Answerer(config.serve, config.data, None, entries)
        try:
            for entry in entries:
                answers[engine_name, entry.name] = [(a.completion, a.completion_tokens, a.finish_reason)
                                                    for part in answerer.answers(entry, records, Sampling(12))
                                                    for a in part]
            engine = answerer.engine(entries[0].weights)
            if engine_name == "vllm":
                started = engine.engine.vllm_config.lora_config
                assert engine.prompts_per_batch == engine.engine.vllm_config.scheduler_config.max_num_seqs > 6
        finally:
            answerer.close()
    assert started.max_lora_rank == 16 and sorted(started.target_modules) == ["down_proj", "q_proj", "v_proj"]
    for name in models:
        assert answers["vllm", name] == answers["transformers", name], name
    assert answers["vllm", "attention"] != answers["vllm", "base"], "the adapters change answers"
