"""The Alpaca prompt template (Taori et al., 2023), with and without an input."""

from __future__ import annotations

from typing import Mapping

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(record: Mapping[str, str]) -> str:
    """The prompt the model sees before the response; the loss never covers it."""
    instruction = record["instruction"]
    extra = record.get("input") or ""
    if extra.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)
