"""The vLLM engine: GPU nodes with the ``vllm`` extra; adapters through vLLM's LoRA requests.

Imported only when chosen, so machines without vLLM never import it. It serves
the same API and the same usage numbers as the transformers engine: time to
first token is taken when the first output arrives, the rate from the tokens
after it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import AsyncIterator

from raytune_it.serving.engines.base import GenerationRequest, GenerationResult, StreamChunk, check_request
from raytune_it.serving.engines.transformers_engine import local_adapter_dir
from raytune_it.storage import folder_name


class VLLMEngine:
    def __init__(self, serve_config: dict) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.lora.request import LoRARequest

        from raytune_it.models.loading import load_tokenizer, resolve_model_path

        self.config = serve_config
        base_path = resolve_model_path(serve_config["base_model"])
        self.base_name = serve_config.get("model_name") or folder_name(serve_config["base_model"])
        self.dtype = "bfloat16" if serve_config["dtype"] == "auto" else serve_config["dtype"]
        self.tokenizer = load_tokenizer(base_path)
        ids = itertools.count(1)
        self.loras = {name: LoRARequest(name, next(ids), str(local_adapter_dir(name, path)))
                      for name, path in serve_config["adapters"].items()}
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
            model=base_path, dtype=self.dtype, max_model_len=serve_config["max_model_len"],
            enable_lora=bool(self.loras), max_loras=max(1, len(self.loras)), max_lora_rank=64,
        ))

    def model_names(self) -> list[str]:
        return [self.base_name, *self.loras]

    def info(self) -> dict[str, str]:
        import torch

        return {"engine": "vllm", "dtype": self.dtype, "device": torch.cuda.get_device_name(0)}

    @property
    def max_model_len(self) -> int:
        return int(self.config["max_model_len"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        from raytune_it.serving.engines.transformers_engine import TransformersEngine

        return TransformersEngine.render_chat(self, messages)  # same rule: chat template, else Alpaca

    def _prepare(self, request: GenerationRequest):
        from vllm import SamplingParams, TokensPrompt

        ids = list(request.prompt) if isinstance(request.prompt, list) else self.tokenizer(request.prompt)["input_ids"]
        check_request(request.model, self.model_names(), len(ids), request.max_tokens, self.max_model_len)
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                                stop=request.stop or None, seed=request.seed, ignore_eos=request.ignore_eos)
        return TokensPrompt(prompt_token_ids=ids), params, self.loras.get(request.model), len(ids)

    def check(self, request: GenerationRequest) -> object:
        return self._prepare(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        prompt, params, lora, prompt_tokens = self._prepare(request)
        started, first, text, output = time.perf_counter(), None, "", None
        async for output in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex, lora_request=lora):
            if first is None:
                first = time.perf_counter()
            new_text = output.outputs[0].text
            if len(new_text) > len(text):
                yield StreamChunk(new_text[len(text):])
                text = new_text
        ended = time.perf_counter()
        completion = output.outputs[0] if output is not None else None
        yield StreamChunk("", GenerationResult(
            text=text, prompt_tokens=prompt_tokens,
            completion_tokens=len(completion.token_ids) if completion else 0,
            finish_reason=(completion.finish_reason or "stop") if completion else "stop",
            time_to_first_token_s=(first or ended) - started, latency_s=ended - started))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = None
        async for chunk in self.stream(request):
            result = chunk.result or result
        assert result is not None
        return result
