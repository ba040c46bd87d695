"""The engine protocol: load a base and its adapters, generate or stream, count tokens and time.

Timing is measured inside the engine, around the model itself, so what the HTTP
layer (and Serve's stream batching) does cannot distort the generation rate:
``time_to_first_token_s`` covers the prompt's forward pass and the first token;
``tokens_per_second`` is the completion tokens after the first over the time
spent producing them (the decode rate the survey reports at batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def check_request(model: str, names: list[str], prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The checks every engine makes before generating: a served model, and room in the context."""
    if model not in names:
        raise EngineError(f"model {model!r} does not exist; available: {', '.join(names)}",
                          status=404, code="model_not_found", param="model")
    if prompt_tokens == 0:
        raise EngineError("the prompt is empty", param="prompt")
    if prompt_tokens + max_tokens > max_model_len:
        raise EngineError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                          f"context of {max_model_len} tokens", code="context_length_exceeded", param="prompt")


@dataclass
class GenerationRequest:
    model: str
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


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
    def model_names(self) -> list[str]:
        """The base model's name first, then every adapter's."""

    def info(self) -> dict[str, str]:
        """engine, dtype and device, for the latency report."""

    def count_tokens(self, text: str) -> int: ...

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template where the tokenizer has one, the Alpaca template otherwise."""

    @property
    def max_model_len(self) -> int: ...

    def check(self, request: GenerationRequest) -> object:
        """Raise EngineError for a request it cannot serve (unknown model, over the context)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]: ...
