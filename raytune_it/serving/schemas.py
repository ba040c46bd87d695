"""OpenAI request bodies, validated; errors become OpenAI-style JSON with the field named.

Strict at the edge: every number has the range an engine can take, and a parameter this server does not
implement is refused with a 400 naming it, never silently ignored. Parameters clients send with their
neutral default (``n=1``, ``logprobs=null``, ``presence_penalty=0`` ...) are accepted, since SDKs and
frameworks send them; any other value is refused. Unknown fields are refused too. Types are strict, as
OpenAI's are: ``"5"`` or ``true`` where a number goes is a 400 naming the field, never read as 5 or 1.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raytune_it.data.chat import ROLE_ALIASES, content_text
from raytune_it.serving.engines.base import SAMPLING_EPS

# OpenAI accepts int64 seeds; so do torch's and vLLM's generators.
MAX_SEED = 2**63 - 1

# Not implemented: accepted only with the value that means "not used".
NEUTRAL: dict[str, tuple[Any, ...]] = {
           "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
           "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
           "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
           "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},)}
# Harmless metadata clients send: accepted and not used.
METADATA = ("user", "stream_options", "metadata", "store", "service_tier")


#: Every request body: unknown fields refused, no type coercion (JSON's types are the client's intent).
STRICT = ConfigDict(extra="forbid", strict=True)


def is_neutral(value: Any, neutral: tuple) -> bool:
    """``value`` is one of the neutral values; a boolean never stands for a number, nor a number for one."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False

    @classmethod
    def normalise(cls, data: dict) -> dict:
        """Drop metadata and neutral values of unimplemented parameters; refuse any other value of them."""
        data = dict(data)
        if data.get("max_completion_tokens") is not None and "max_tokens" not in data:
            data["max_tokens"] = data.pop("max_completion_tokens")  # the newer name of the same limit
        for name in list(data):
            if name in METADATA:
                data.pop(name)
            elif name in NEUTRAL:
                value = data.pop(name)
                if value is not None and not is_neutral(value, NEUTRAL[name]):
                    raise UnsupportedParameter(name, f"{name}: {value!r} is not supported by this server; leave "
                                                     f"it out or send {' or '.join(repr(v) for v in NEUTRAL[name])}")
        return data

    @field_validator("temperature")
    @classmethod
    def _greedy_below_eps(cls, value: float) -> float:
        # Dividing logits by a temperature this small overflows: every engine decodes greedily instead.
        return 0.0 if value < SAMPLING_EPS else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if len(values) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(v) > 256 for v in values):
            raise ValueError("a stop sequence is at most 256 characters")
        return [v for v in values if v]


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # name, tool_call_id ...: not used by a text model

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported; this model takes text "
                                     "parts only ({'type': 'text', 'text': ...})")
        return value

    def as_dict(self) -> dict[str, str]:
        """The message for a chat template: text parts joined with newlines; 'developer' is 'system'."""
        content = self.content if isinstance(self.content, str) else [p.model_dump() for p in self.content]
        return {"role": ROLE_ALIASES.get(self.role, self.role), "content": content_text(content, self.role)}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class LatencyRequest(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = Field(None, min_length=1)
    prompt_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                      description="Instead of prompt: a synthetic prompt of this length.")
    max_tokens: int = Field(64, ge=1)
    repeats: int = Field(5, ge=1, le=50)
    ignore_eos: bool = Field(True, description="Generate exactly max_tokens tokens, for comparable timings.")
