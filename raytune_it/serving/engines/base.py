"""The engine protocol, and what every engine shares: prompts, stop strings, counting and timing.

Timing is measured inside the engine, around the model itself, so what the HTTP
layer (and Serve's routing) does cannot distort the generation rate:
``time_to_first_token_s`` covers the prompt's forward pass and the first token;
``tokens_per_second`` is the completion tokens after the first over the time
spent producing them (the decode rate the survey reports at batch size 1).

Completion tokens are every token the model produced, the end-of-sequence token
included (one more forward pass, as vLLM and the OpenAI API count it); the text
never contains it. Both engines build prompts here (``PromptBuilder``) and cut
stop strings here (``StopScanner``), so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from raytune_it.data.prompt_format import PromptFormat

# Below this temperature sampling is greedy (vLLM's rule too): dividing logits by it would overflow.
SAMPLING_EPS = 1e-5


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def __reduce__(self):  # crosses Serve's handles as a value: keep status, code and param
        return EngineError, (str(self), self.status, self.code, self.param)


def check_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens == 0:
        raise EngineError("the prompt is empty", param="prompt")
    if prompt_tokens + max_tokens > max_model_len:
        raise EngineError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                          f"context of {max_model_len} tokens", code="context_length_exceeded", param="prompt")


@dataclass
class GenerationRequest:
    """One generation. The prompt is exactly one of: text, token ids, chat messages (rendered with the
    model's template) or ``synthetic_tokens`` (a filler prompt of that length, for timing runs)."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    synthetic_tokens: int | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    #: Tokens that end the answer, set by a caller that built the prompt ids with its own prompt format
    #: (eval, generate); None: the served model's format decides.
    stop_token_ids: list[int] | None = None
    adapter_folder: str | None = None  # set by the serving layer, never by a client: the adapter to use


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    latency_s: float

    @property
    def decode_seconds(self) -> float:
        return max(self.latency_s - self.time_to_first_token_s, 0.0)

    @property
    def tokens_per_second(self) -> float:
        if self.completion_tokens > 1 and self.decode_seconds > 0:
            return (self.completion_tokens - 1) / self.decode_seconds
        return self.completion_tokens / self.latency_s if self.latency_s > 0 else 0.0

    @property
    def time_per_output_token_s(self) -> float:
        return self.decode_seconds / (self.completion_tokens - 1) if self.completion_tokens > 1 else self.latency_s


@dataclass
class StreamChunk:
    """A piece of streamed text; the last chunk carries the finished result."""

    text: str
    result: GenerationResult | None = None


class Engine(Protocol):
    """What the serving layer uses of an engine, and nothing more. Adapters are named by the caller and
    loaded from a folder it has already checked (``serving.adapters``)."""

    base_name: str
    tokens_generated: int  # every token this engine generated, abandoned generations included
    prompts_per_batch: int  # what one generate_batch call should carry to keep the engine busy

    def info(self) -> dict[str, str]:
        """engine, dtype and device, for the latency report."""

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids, checked against the context (EngineError otherwise)."""

    def load_adapter(self, name: str, folder: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Many requests at once, results in order (eval and ``raytune-it generate``); at temperature 0 each
        answer is the one ``generate`` gives the request alone."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]: ...

    def shutdown(self) -> None: ...


class PromptBuilder:
    """Turns a request into prompt token ids, and says what ends its answer, with the base model's tokenizer
    and the model's prompt format (``data.prompt_format``), the same way for every engine and as training
    built them."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.base_format = PromptFormat.of_tokenizer(tokenizer)
        self._formats: dict[str, PromptFormat] = {}

    def prompt_format(self, adapter_folder: str | None) -> PromptFormat:
        """An adapter's own format (the one its run trained with, saved with its tokenizer), else the base's."""
        if adapter_folder is None:
            return self.base_format
        if adapter_folder not in self._formats:
            self._formats[adapter_folder] = PromptFormat.of_model(adapter_folder, self.tokenizer, self.base_format)
        return self._formats[adapter_folder]

    def ids(self, request: GenerationRequest) -> list[int]:
        if request.synthetic_tokens is not None:  # checked before building: a huge length costs nothing
            check_length(request.synthetic_tokens, request.max_tokens, self.max_model_len)
            return self.synthetic(request.synthetic_tokens)
        prompt_format = self.prompt_format(request.adapter_folder)
        if request.messages is not None:
            text = prompt_format.prompt_text({"messages": request.messages})
        elif isinstance(request.prompt, list):
            ids = list(request.prompt)
            check_length(len(ids), request.max_tokens, self.max_model_len)
            return ids
        else:
            text = request.prompt or ""
        # A prompt longer than the context in characters is over it in tokens too: refuse before tokenizing.
        if len(text) > 16 * self.max_model_len:
            raise EngineError(f"the prompt ({len(text)} characters) cannot fit the context of "
                              f"{self.max_model_len} tokens", code="context_length_exceeded", param="prompt")
        try:
            ids = prompt_format.text_ids(text)
        except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot take (lone surrogates ...) is the client's
            raise EngineError(f"the prompt cannot be tokenized: {type(exc).__name__}: {exc}"[:300],
                              param="messages" if request.messages is not None else "prompt") from None
        check_length(len(ids), request.max_tokens, self.max_model_len)
        return ids

    def ending(self, request: GenerationRequest) -> tuple[set[int], list[str]]:
        """(the tokens that end the answer, the stop strings that cut it): the format's end of turn and the
        request's own stop strings; with ``ignore_eos`` only the latter."""
        if request.ignore_eos:
            return set(), list(request.stop)
        if request.stop_token_ids is not None:
            return set(request.stop_token_ids), list(request.stop)
        prompt_format = self.prompt_format(request.adapter_folder)
        return set(prompt_format.stop_token_ids), [*request.stop, *prompt_format.stop_strings]

    def synthetic(self, length: int) -> list[int]:
        filler = self.tokenizer(" the", add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return (bos + filler * length)[:length]


class StopScanner:
    """Decodes generated tokens into text as they come, cuts it at the first stop string and says what may
    be streamed, in time linear in the answer's length.

    Decoding is incremental and primed with the prompt, as vLLM's detokenizer does it (so both engines give
    the same text, a SentencePiece answer's leading space included): a fast tokenizer's own
    ``DecodeStream`` (the ``tokenizers`` library's), else a short window that starts at the token before
    the last decoded text and moves on once it yields whole characters (vLLM's way for slow tokenizers).
    A stop string is looked for only in the new text plus the longest stop string's overlap with the text
    before it. Text that could still turn into a stop string (a stop string's prefix at the end) and a
    trailing partial UTF-8 character are held back, so a stream never shows what the final answer drops.
    """

    #: Prompt tokens a slow tokenizer's first window starts with (vLLM's ``INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET``).
    PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Any, stop: list[str], prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.sent, self.stopped = "", 0, False
        self.tokens: list[int] = []
        self._overlap = max((len(s) for s in self.stop), default=1) - 1
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
            self._decoded = 0  # generated tokens whose text the stream has given
        else:
            # The slow path reads a window of (the prompt's last tokens + the answer): [prefix, read) of that
            # sequence is what it decoded last.
            self._context = list(prompt_ids[-self.PROMPT_CONTEXT:])
            self._prefix, self._read = 0, len(self._context)

    def push(self, token: int) -> None:
        """One more generated token (ignored once a stop string has ended the answer)."""
        if self.stopped:
            return
        self.tokens.append(token)
        if self._backend is not None:
            piece = self._stream.step(self._backend, token)
            if piece is not None:
                self._decoded = len(self.tokens)
                self._add(piece)
        else:
            self._add(self._decode_window(final=False))

    def update(self, tokens: list[int]) -> str:
        """Feed the tokens so far (only those past the last call are read); return the newly streamable
        text."""
        for token in tokens[len(self.tokens):]:
            if self.stopped:
                break
            self.push(token)
        return self._take(len(self.text) if self.stopped else self._safe_length())

    def finish(self) -> str:
        """The rest of the text once generation has ended, an unfinished UTF-8 character included (as
        replacement characters, as one decode of the whole answer gives it)."""
        if not self.stopped:
            if self._backend is not None:
                rest = self.tokens[self._decoded:]
                self._add(self.tokenizer.decode(rest, skip_special_tokens=True) if rest else "")
            else:
                self._add(self._decode_window(final=True))
        return self._take(len(self.text))

    def _span(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the prompt's last tokens followed by the answer, without joining the two."""
        context = len(self._context)
        return self._context[start:end] + self.tokens[max(start - context, 0):max(end - context, 0)]

    def _decode_window(self, final: bool) -> str:
        end = len(self._context) + len(self.tokens)
        before = self.tokenizer.decode(self._span(self._prefix, self._read), skip_special_tokens=True)
        after = self.tokenizer.decode(self._span(self._prefix, end), skip_special_tokens=True)
        # A trailing replacement character is a UTF-8 sequence still incomplete: wait for its next byte.
        if len(after) < len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, end
        return after[len(before):]

    def _add(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.text) - self._overlap)
        self.text += new
        cut = min((found for found in (self.text.find(s, start) for s in self.stop) if found >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True

    def _take(self, ready: int) -> str:
        piece = self.text[self.sent:ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return piece

    def _safe_length(self) -> int:
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        held = max((size for stop in self.stop for size in range(1, len(stop))
                    if self.text.endswith(stop[:size], 0, end)), default=0)
        return end - held


class EngineThread:
    """Runs an engine's coroutines from synchronous code (eval, ``raytune-it generate``) on one event loop
    of its own, in a thread: vLLM's engine keeps tasks on the loop it first ran on, so every call must use
    the same loop."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="raytune-it-engine", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def call(self, function: Callable[[], Any]) -> Any:
        """``function()`` on the loop's thread: an engine's shutdown, so that vLLM cancels its tasks there before
        they can see its process gone (they would log that as a failure)."""

        async def on_loop() -> Any:
            return function()

        return self.run(on_loop())

    def close(self) -> None:
        """Cancel what is left on the loop and wait for it, then stop: no task is destroyed pending."""
        import asyncio

        async def drain() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()
