"""OpenAI request bodies, validated; errors become OpenAI-style JSON with the field named."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    # Clients send fields we do not use (n=1, logprobs=None, user, ...): ignore them, do not fail.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if len(values) > 4:
            raise ValueError("at most 4 stop sequences")
        return values


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class LatencyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = Field(None, min_length=1)
    prompt_tokens: int | None = Field(None, ge=1, description="Instead of prompt: a synthetic prompt of this length.")
    max_tokens: int = Field(64, ge=1)
    repeats: int = Field(5, ge=1, le=50)
    ignore_eos: bool = Field(True, description="Generate exactly max_tokens tokens, for comparable timings.")
