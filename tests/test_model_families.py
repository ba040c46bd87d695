"""Today's model families, as tiny random models built here: LLaMA-3-style (grouped-query attention, a
large vocabulary, the Llama 3 chat format), Qwen2-style (biased q/k/v, ChatML) and Mistral-style
(sliding-window attention, a SentencePiece-style tokenizer). Each loads, trains a LoRA adapter, exports,
serves its base and the adapter with its own chat template, and plans. ZeRO-3 runs on LLaMA-3 only (its
grouped-query attention and large vocabulary are what partitioning could get wrong): a ZeRO-3 run costs
a Ray Train start of its own, and ZeRO-3's partitioning does not depend on the family's other traits."""

import httpx
import pytest

from helpers import free_port
from raytune_it.config import load_config
from raytune_it.models.tiny import TINY_FAMILIES
from raytune_it.train.driver import train

pytestmark = pytest.mark.integration
FAMILIES = [name for name in TINY_FAMILIES if name != "tiny-llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_serves_its_adapter_and_plans(local_ray, tmp_path, family):
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_it.models.loading import resolve_model_path
    from raytune_it.plan.planner import plan, workload_from_config
    from raytune_it.serving.run import start

    common = [f"run.storage={tmp_path}", f"model.name_or_path={family}", "scaling.num_workers=1",
              "train.max_steps=2", "train.eval_every_steps=2", "train.micro_batch_size=4",
              "data.builtin_records=200"]
    lora = train(load_config("tiny-lora", [*common, "run.name=lora"]))
    assert lora.steps == 2 and lora.strategy["quantization"] == "int8"
    base_dir = resolve_model_path(family)
    if family == "tiny-llama3":
        full = train(load_config("tiny-full", [*common, "run.name=full", "deepspeed.bf16=false"]))
        assert full.steps == 2 and full.strategy["zero_stage"] == 3
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "export")
        assert type(exported).__name__ == type(AutoModelForCausalLM.from_pretrained(base_dir)).__name__
    assert AutoTokenizer.from_pretrained(tmp_path / "lora" / "export").chat_template == \
        AutoTokenizer.from_pretrained(base_dir).chat_template, "the family's own template, recorded with the run"

    port = free_port()
    config = load_config("tiny-lora", [
        f"serve.base_model={family}", f"serve.model_name={family}", f"serve.port={port}",
        f'serve.adapters={{"tuned": "{tmp_path / "lora" / "export"}"}}', "serve.max_model_len=512",
        f"serve.app_name={family}"])
    url = start(config)
    try:
        for model in (family, "tuned"):
            response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": model, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Convert 2 hours to minutes."}]})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()

    planned = plan(workload_from_config(load_config("tiny-lora", common)))
    assert planned.feasible and planned.parameters > 0
