"""The transformers engine (peft for adapters): CPU or GPU, one generation at a time.

One replica loads the base once and every configured adapter onto it as named
peft adapters; a request picks one with ``set_adapter`` (or runs the bare base
with the adapters disabled). Generation is a plain KV-cached decode loop, so
time to first token and the per-token rate are measured exactly where they
happen. Requests are serialised with a lock: adapter switching is model state,
and batch size 1 is what the survey measures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from raytune_it.serving.engines.base import GenerationRequest, GenerationResult, StreamChunk, check_request
from raytune_it.storage import folder_name


def _adapter_problem(files: set[str]) -> str | None:
    if "adapter_config.json" not in files:
        return "is not a peft adapter directory (no adapter_config.json)"
    if "adapter_model.safetensors" not in files:
        return ("has no adapter_model.safetensors; only safetensors weights are loaded (a pickled "
                "adapter_model.bin is never unpickled)")
    return None


def check_adapter_dir(name: str, path: str) -> None:
    """On the driver, before any replica starts: the adapter folder exists, locally or in storage
    (listed, not downloaded), and holds safetensors weights."""
    from raytune_it.storage import is_uri, open_location, storage_cause

    key = f"serve.adapters.{name}"
    if is_uri(path):
        try:
            files = set(open_location(path, key).files())
        except OSError as exc:
            raise ValueError(f"{key}: cannot list {path!r}: {storage_cause(exc)}") from None
    else:
        folder = Path(path).expanduser().resolve()
        files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    problem = _adapter_problem(files)
    if problem:
        raise ValueError(f"{key}: {path!r} {problem}")


def local_adapter_dir(name: str, path: str) -> Path:
    """On a replica: adapters load from their configured folder only (a URI is fetched into this node's
    cache first), and only as safetensors."""
    from raytune_it.storage import fetch_dir, is_uri, open_location

    key = f"serve.adapters.{name}"
    folder = fetch_dir(open_location(path, key), key) if is_uri(path) else Path(path).expanduser().resolve()
    problem = _adapter_problem({p.name for p in folder.iterdir()} if folder.is_dir() else set())
    if problem:
        raise ValueError(f"{key}: {path!r} {problem}")
    return folder


class TransformersEngine:
    def __init__(self, serve_config: dict) -> None:
        import torch

        from raytune_it.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

        self.config = serve_config
        self.device = torch.device("cuda" if serve_config["use_gpu"] and torch.cuda.is_available() else "cpu")
        dtype = serve_config["dtype"]
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = dtype
        base_path = resolve_model_path(serve_config["base_model"])
        self.base_name = serve_config.get("model_name") or folder_name(serve_config["base_model"])
        self.tokenizer = load_tokenizer(base_path)
        model = load_causal_lm(base_path, precision=dtype).to(self.device).eval()
        self.adapter_names: list[str] = []
        for name, path in serve_config["adapters"].items():
            folder = local_adapter_dir(name, path)
            if not self.adapter_names:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                model.load_adapter(str(folder), adapter_name=name)
            self.adapter_names.append(name)
        self.model = model.eval()
        self._lock = threading.Lock()

    # --- protocol ---------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapter_names]

    def info(self) -> dict[str, str]:
        name = self.device.type if self.device.type == "cpu" else __import__("torch").cuda.get_device_name(self.device)
        return {"engine": "transformers", "dtype": self.dtype, "device": name}

    @property
    def max_model_len(self) -> int:
        return int(self.config["max_model_len"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        from raytune_it.data.templates import render_prompt

        # Alpaca has one instruction and one input: the last user turn is the instruction, the
        # system prompt and earlier turns become the input.
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        context = "\n".join(f"{m['role']}: {m['content']}" for i, m in enumerate(messages) if i != last_user)
        return render_prompt({"instruction": messages[last_user]["content"], "input": context})

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await asyncio.to_thread(self._generate, request, None)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, StreamChunk(text))

        def run() -> None:
            try:
                result = self._generate(request, emit)
                loop.call_soon_threadsafe(queue.put_nowait, StreamChunk("", result))
            except BaseException as exc:  # surfaced to the HTTP layer below
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, run)
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                break
        await worker

    # --- generation ------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> list[int]:
        if request.model not in self.model_names():  # before tokenizing anything
            check_request(request.model, self.model_names(), 1, 0, self.max_model_len)
        prompt = request.prompt
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        check_request(request.model, self.model_names(), len(ids), request.max_tokens, self.max_model_len)
        return ids

    def _select(self, name: str) -> Any:
        import contextlib

        if name in self.adapter_names:
            self.model.set_adapter(name)
            return contextlib.nullcontext()
        return self.model.disable_adapter() if self.adapter_names else contextlib.nullcontext()

    def _next_token(self, logits: Any, request: GenerationRequest, generator: Any) -> int:
        import torch

        if request.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p
            sorted_probs = sorted_probs * keep
            return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generate(self, request: GenerationRequest, emit: Callable[[str], None] | None) -> GenerationResult:
        import torch

        ids = self.check(request)
        eos = self.tokenizer.eos_token_id
        with self._lock, torch.inference_mode(), self._select(request.model):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed if request.seed is not None else int(time.time_ns() % 2**31))
            started = time.perf_counter()
            first_token_at = None
            tokens: list[int] = []
            text, finish = "", "length"
            inputs, past = torch.tensor([ids], device=self.device), None
            for _ in range(request.max_tokens):
                out = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = self._next_token(out.logits[0, -1], request, generator)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if token == eos and not request.ignore_eos:
                    finish = "stop"
                    break
                tokens.append(token)
                inputs = torch.tensor([[token]], device=self.device)
                if emit is None and not request.stop:
                    continue  # nothing to look at mid-way: decode once at the end
                new_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((new_text.find(s) for s in request.stop if s and s in new_text), default=-1)
                if cut >= 0:
                    new_text, finish = new_text[:cut], "stop"
                if emit is not None and len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                    emit(new_text[len(text):])
                    text = new_text
                elif emit is None:
                    text = new_text
                if finish == "stop":
                    break
            ended = time.perf_counter()
        final = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((final.find(s) for s in request.stop if s and s in final), default=-1)
        final = final[:cut] if cut >= 0 else final
        if emit is not None and len(final) > len(text):
            emit(final[len(text):])
        return GenerationResult(
            text=final, prompt_tokens=len(ids), completion_tokens=len(tokens), finish_reason=finish,
            time_to_first_token_s=(first_token_at or ended) - started, latency_s=ended - started,
        )
