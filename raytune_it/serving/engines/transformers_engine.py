"""The transformers engine (peft for adapters): CPU or GPU; serving generates one request at a time, eval
and ``raytune-it generate`` send greedy batches (``generate_batch``).

One replica loads the base once; adapters are added to it as named peft adapters
when the serving layer loads them and deleted when it evicts them, and a request
picks one with ``set_adapter`` (or runs the bare base with the adapters
disabled). Generation is a plain KV-cached decode loop, so time to first token
and the per-token rate are measured exactly where they happen. Requests are
serialised with a lock: the active adapter is model state, and batch size 1 is
what the survey measures.

A batch (``generate_batch``) runs transformers' own ``generate`` over left-padded prompts: the attention
mask hides the padding and the positions start at each prompt's first token, so a greedy answer in a
batch is the answer the prompt gets alone (tested token for token). Sampled requests keep their own seed
and run one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
from typing import Any, AsyncIterator, Callable

from raytune_it.config.schema import ServeSection
from raytune_it.serving.engines.base import (
    SAMPLING_EPS,
    EngineError,
    GenerationRequest,
    GenerationResult,
    PromptBuilder,
    StopScanner,
    StreamChunk,
)


@functools.cache
def _kv_cache_name() -> str:
    """The KV cache's name in a model's call and output: transformers 5.2x renamed ``past_key_values`` to
    ``cache`` (and warns at the old name); the 5.19 that vLLM's CPU build needs has only the old one."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class TransformersEngine:
    # A static batch: each call pads its prompts to the longest and runs until its longest answer ends, so more
    # prompts per call stop paying once the forward pass is no longer overhead-bound.
    prompts_per_batch = 16

    def __init__(self, serve_config: ServeSection, base_path: str, base_name: str) -> None:
        import torch

        from raytune_it.models.loading import load_causal_lm, load_tokenizer

        self.device = torch.device("cuda" if serve_config.use_gpu and torch.cuda.is_available() else "cpu")
        dtype = serve_config.dtype
        self.dtype = ("bfloat16" if self.device.type == "cuda" else "float32") if dtype == "auto" else dtype
        self.base_name = base_name
        self.tokenizer = load_tokenizer(base_path)
        self.prompts = PromptBuilder(self.tokenizer, int(serve_config.max_model_len))
        self.model: Any = load_causal_lm(base_path, precision=self.dtype).to(self.device).eval()
        # peft adapter names are internal ("adapter3"): a served name like "lora" or "a.b" would clash with
        # peft's module prefixes. The last adapter cannot be deleted from a PeftModel, so an evicted one is
        # retired and deleted when the next is loaded.
        self._peft_names: dict[str, str] = {}
        self._retired: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.tokens_generated = 0

    # --- protocol ---------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        import torch

        device = "cpu" if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        return {"engine": "transformers", "dtype": self.dtype, "device": device}

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.prompts.ids(request)

    def load_adapter(self, name: str, folder: str) -> None:
        with self._lock:
            self._ensure(name, folder)

    def _ensure(self, name: str, folder: str) -> str:
        """The adapter's peft name, loading it first if it is not on the model (the lock is held)."""
        if name in self._peft_names:
            return self._peft_names[name]
        peft_name = f"adapter{next(self._ids)}"
        try:
            if not self._peft_names and not self._retired:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=peft_name).eval()
            else:
                self.model.load_adapter(folder, adapter_name=peft_name)
        except Exception as exc:  # checked before, so this is an adapter peft itself cannot read
            raise EngineError(f"adapter {name!r} cannot be loaded: {exc}", code="invalid_adapter",
                              param="model") from None
        self._peft_names[name] = peft_name
        for retired in self._retired:
            self.model.delete_adapter(retired)
        self._retired.clear()
        return peft_name

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            peft_name = self._peft_names.pop(name, None)
            if peft_name is None:
                return
            if self._peft_names:
                self.model.delete_adapter(peft_name)
            else:
                self._retired.append(peft_name)

    def shutdown(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self._generate, request, None, cancelled)
        except asyncio.CancelledError:  # the caller went away (Serve cancels a request whose client left)
            cancelled.set()
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, StreamChunk(text))

        def run() -> None:
            try:
                result = self._generate(request, emit, cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, StreamChunk("", result))
            except BaseException as exc:  # surfaced to the serving layer below
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, run)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.result is not None:
                    break
        finally:
            cancelled.set()  # a client that left stops the generation at the next token
            await worker

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self._generate_batch, requests)

    # --- generation ------------------------------------------------------------------------

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Greedy requests in batches of one adapter each; sampled ones (their own seeds) and ``ignore_eos``
        ones (timing runs) one at a time."""
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            if request.temperature >= SAMPLING_EPS or request.ignore_eos:
                results[index] = self._generate(request, None, threading.Event())
            else:
                groups.setdefault(request.model if request.adapter_folder else None, []).append(index)
        for indices in groups.values():
            for index, result in zip(indices, self._greedy_batch([requests[i] for i in indices])):
                results[index] = result
        return [result for result in results if result is not None]

    def _greedy_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        prompts = [self.prompts.ids(request) for request in requests]
        endings = [self.prompts.ending(request) for request in requests]
        stop_ids = sorted(set().union(*(ids for ids, _ in endings)))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1

        class FirstToken(BaseStreamer):  # generate calls put() with the prompt, then with each step's tokens
            calls, at = 0, None

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.at = time.perf_counter()

            def end(self) -> None:
                pass

        first = FirstToken()
        with self._lock, torch.inference_mode(), self._select(requests[0]):
            started = time.perf_counter()
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                max_new_tokens=max(request.max_tokens for request in requests), eos_token_id=stop_ids or None,
                pad_token_id=pad, streamer=first, top_p=None, top_k=None, temperature=None)
            ended = time.perf_counter()
        new_tokens = out[:, width:].tolist()
        self.tokens_generated += sum(len(row) for row in new_tokens)
        results = []
        for request, ids, (row_stops, stop_strings), row in zip(requests, prompts, endings, new_tokens):
            tokens, finish = [], "length"
            for token in row[:request.max_tokens]:
                tokens.append(token)
                if token in row_stops:
                    finish = "stop"
                    break
            text, tokens, cut = _cut_at_stop_string(self.tokenizer, ids, tokens, stop_strings)
            results.append(GenerationResult(
                text=text, prompt_tokens=len(ids), completion_tokens=len(tokens),
                finish_reason="stop" if cut else finish,
                time_to_first_token_s=(first.at or ended) - started, latency_s=ended - started))
        return results

    def _select(self, request: GenerationRequest) -> Any:
        """Make the request's adapter the active one (loading it if it was evicted meanwhile), or disable
        the adapters for the base model. The lock is held."""
        if request.adapter_folder is not None:
            peft_name = self._ensure(request.model, request.adapter_folder)  # may wrap self.model: first
            self.model.set_adapter(peft_name)
            return contextlib.nullcontext()
        return self.model.disable_adapter() if self._peft_names or self._retired else contextlib.nullcontext()

    def _next_token(self, logits: Any, request: GenerationRequest, generator: Any) -> int:
        import torch

        if request.temperature < SAMPLING_EPS:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = sorted_probs * keep
            return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generate(self, request: GenerationRequest, emit: Callable[[str], None] | None,
                  cancelled: threading.Event) -> GenerationResult:
        import torch

        ids = self.prompts.ids(request)
        stop_ids, stop_strings = self.prompts.ending(request)
        scanner = StopScanner(self.tokenizer, stop_strings, ids)
        cache_name = _kv_cache_name()
        with self._lock, torch.inference_mode(), self._select(request):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed if request.seed is not None else int(time.time_ns() % 2**31))
            started = time.perf_counter()
            first_token_at = None
            tokens: list[int] = []
            finish = "length"
            inputs, past = torch.tensor([ids], device=self.device), None
            for _ in range(request.max_tokens):
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                out = self.model(input_ids=inputs, use_cache=True, **{cache_name: past})
                past = getattr(out, cache_name)
                token = self._next_token(out.logits[0, -1], request, generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                tokens.append(token)  # EOS included: it is a generated token (see base)
                self.tokens_generated += 1
                if token in stop_ids:
                    finish = "stop"
                    break
                inputs = torch.tensor([[token]], device=self.device)
                if emit is None and not stop_strings:
                    continue  # nothing to look at mid-way: decode once at the end
                piece = scanner.update(tokens)
                if emit is not None and piece:
                    emit(piece)
                if scanner.stopped:
                    finish = "stop"
                    break
            ended = time.perf_counter()
        scanner.update(tokens)
        if scanner.stopped:
            finish = "stop"
        rest = scanner.finish()
        if emit is not None and rest:
            emit(rest)
        return GenerationResult(
            text=scanner.text, prompt_tokens=len(ids), completion_tokens=len(tokens), finish_reason=finish,
            time_to_first_token_s=(first_token_at or ended) - started, latency_s=ended - started,
        )


def _cut_at_stop_string(tokenizer: Any, prompt_ids: list[int], tokens: list[int],
                        stop: list[str]) -> tuple[str, list[int], bool]:
    """(text, tokens, cut?): the answer as the one-at-a-time path gives it, which stops generating at the
    first token whose text completes a stop string."""
    scanner = StopScanner(tokenizer, stop, prompt_ids)
    for count, token in enumerate(tokens, 1):
        scanner.push(token)
        if scanner.stopped:
            return scanner.text, tokens[:count], True
    scanner.finish()
    return scanner.text, tokens, scanner.stopped
