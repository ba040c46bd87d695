"""The run's prompt format: how a record or a conversation becomes prompt text and ids, and what ends an answer.

One ``PromptFormat`` decides it for training, eval, ``raytune-it generate`` and both serving engines, so a
model is always asked the way it was taught:

- **alpaca** (``chat_template`` None): an Alpaca record becomes the Alpaca prompt (``templates``); a
  conversation (a chat request) becomes the Alpaca prompt of its last user turn, the earlier turns as input.
- **chat**: records and conversations are rendered by the chat template with transformers'
  ``apply_chat_template``; an Alpaca record is one user turn (instruction, then input).

A run resolves its format once, from the tokenizer and ``data.template`` (``for_run``), and saves it with
its export as the tokenizer's chat template (``record_on``): an export without one is an alpaca-format
model. What ends an answer is EOS, plus the template's end of turn (``<|eot_id|>``, ``<|im_end|>``): a
stop token where the tokenizer has it as one token, else a stop string, so a model tuned here and a
released chat model both end where the template ends a turn.

Prompt ids are the rendered text tokenized as training tokenizes it: BOS first unless the text already
starts with it (a template that writes BOS itself), no other special tokens.
"""

from __future__ import annotations

import functools
import json
from bisect import bisect_left
from typing import Any, Mapping, Sequence

from raytune_it.data.chat import (
    CHAT_TEMPLATES,
    alpaca_messages,
    check_tool_support,
    render,
    template_source,
    trained_spans,
)
from raytune_it.data.templates import render_prompt

#: A stand-in answer, rendered through the template to find the text that ends an assistant turn.
_ANSWER_PROBE = "RAYTUNEITANSWERPROBE"


class PromptFormat:
    """See the module docstring. Built per tokenizer: ``for_run``, ``of_tokenizer`` or ``of_model``."""

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template or None

    # --- where a format comes from ------------------------------------------------------------

    @classmethod
    def for_run(cls, tokenizer: Any, data: Any) -> "PromptFormat":
        """The format a run trains with (``data`` is its DataSection): a named ``data.template``, or for
        ``auto`` the tokenizer's own template; conversations on a tokenizer without one get the Alpaca chat
        template, Alpaca records the Alpaca prompt."""
        return cls(tokenizer, template_source(tokenizer, data))

    @classmethod
    def of_tokenizer(cls, tokenizer: Any, chat_template: str | None = None) -> "PromptFormat":
        """The format a saved model carries: ``chat_template`` if given, else its tokenizer's."""
        return cls(tokenizer, chat_template or getattr(tokenizer, "chat_template", None))

    @classmethod
    def of_model(cls, folder: str, tokenizer: Any, default: "PromptFormat") -> "PromptFormat":
        """The format of a model or adapter folder on ``tokenizer``: the chat template saved with the folder's
        tokenizer (a raytune-it export of a chat-format run has it), else ``default``: the base's format, which
        is also what an alpaca-format export (trained on a base without a template) was trained with."""
        saved = saved_format(folder)
        return default if saved is None else cls(tokenizer, saved)

    def record_on(self, tokenizer: Any) -> None:
        """Save this format with ``tokenizer`` (so with the export it is saved with)."""
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template

    @property
    def style(self) -> str:
        return "alpaca" if self.chat_template is None else "chat"

    # --- training -----------------------------------------------------------------------------

    def training_ids(self, records: Sequence[Mapping[str, Any]]) -> tuple[list[list[int]], list[TokenSpans]]:
        """Each record's text ids (without BOS and EOS) and the spans of them that are trained: the answer of
        an Alpaca record, every assistant turn of a conversation (``chat.trained_spans``)."""
        if self.chat_template is None and all("messages" not in r for r in records):
            prompts = [render_prompt(r) for r in records]
            texts = [prompt + r["output"] for prompt, r in zip(prompts, records)]
            ids, prompt_lengths = joined_ids(self.tokenizer, prompts, texts)
            return ids, [[(length, len(text_ids))] for text_ids, length in zip(ids, prompt_lengths)]
        return conversation_ids(self.tokenizer, self.chat_template or CHAT_TEMPLATES["alpaca"], records)

    @functools.cached_property
    def _bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id  # looked up once: transformers resolves it on every access

    def bos(self, text_ids: list[int]) -> list[int]:
        """BOS to put before ``text_ids``: none when the tokenizer has no BOS or the text starts with it."""
        bos = self._bos_id
        return [] if bos is None or text_ids[:1] == [bos] else [bos]

    # --- generation ---------------------------------------------------------------------------

    def prompt_text(self, item: Mapping[str, Any]) -> str:
        """The text a model continues: ``item`` is an Alpaca record, ``{"messages": [...]}`` (rendered with
        the generation prompt) or ``{"prompt": text}`` (taken as it is)."""
        if "prompt" in item and "messages" not in item and "instruction" not in item:
            return str(item["prompt"])
        if self.chat_template is None:
            return render_prompt(item) if "messages" not in item else _alpaca_chat(item["messages"])
        messages = item["messages"] if "messages" in item else alpaca_messages(dict(item, output=""))[:1]
        tools = item.get("tools") or None
        check_tool_support(self.chat_template, messages, tools)
        return render(self.tokenizer, self.chat_template, list(messages), generation_prompt=True, tools=tools)

    def text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.bos(ids) + ids

    def prompt_ids(self, item: Mapping[str, Any]) -> list[int]:
        return self.text_ids(self.prompt_text(item))

    @functools.cached_property
    def _end_of_turn(self) -> tuple[list[int], list[str]]:
        eos = self.tokenizer.eos_token_id
        ids, strings = ([] if eos is None else [eos]), []
        marker = _turn_end_marker(self.tokenizer, self.chat_template)
        if marker:
            token = self.tokenizer.convert_tokens_to_ids(marker)
            single = isinstance(token, int) and token != self.tokenizer.unk_token_id and \
                self.tokenizer.convert_ids_to_tokens(token) == marker
            if single and token not in ids:
                ids.append(token)
            elif not single:
                strings.append(marker)
        return ids, strings

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer (EOS first); generated, they are counted and never shown."""
        return list(self._end_of_turn[0])

    @property
    def stop_strings(self) -> list[str]:
        """Text that ends an answer where the template's end of turn is not a single token."""
        return list(self._end_of_turn[1])


def split_reference(item: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(what to prompt with, the reference answer or None): an Alpaca record's output; a conversation's
    last assistant turn, the turns before it as the prompt."""
    item = dict(item)
    if "messages" in item:
        messages = list(item["messages"])
        if messages and messages[-1]["role"] == "assistant":
            return dict(item, messages=messages[:-1]), _text(messages[-1]["content"])
        return item, None
    reference = item.get("output")
    return item, reference if isinstance(reference, str) and reference.strip() else None


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def _alpaca_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """A conversation as the Alpaca prompt: the last user turn is the instruction, the other turns the input."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    context = "\n".join(f"{m['role']}: {m['content']}" for i, m in enumerate(messages) if i != last_user)
    return render_prompt({"instruction": messages[last_user]["content"], "input": context})


def _turn_end_marker(tokenizer: Any, template: str | None) -> str | None:
    """The text a template puts after an assistant turn's content (``<|im_end|>``), or None when that is
    only whitespace or EOS (the Alpaca formats, Llama 2's)."""
    if template is None:
        return None
    try:
        text, spans = trained_spans(tokenizer, template, [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": _ANSWER_PROBE}])
    except Exception:  # noqa: BLE001 - a template that cannot render a probe has no marker
        return None
    tail = text[text.rfind(_ANSWER_PROBE) + len(_ANSWER_PROBE):spans[-1][1] if spans else None].strip()
    eos = tokenizer.eos_token
    if eos and tail.endswith(eos):
        tail = tail[:-len(eos)].strip()
    return tail or None


@functools.lru_cache(maxsize=64)
def saved_format(folder: str) -> str | None:
    """The chat template saved with a folder's tokenizer, or None. Read once per folder (transformers writes
    ``chat_template.jinja``; older versions put it in ``tokenizer_config.json``)."""
    from pathlib import Path

    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) and template else None
    return None


#: Token index ranges ``[start, end)`` of a text's ids that are trained, in order.
TokenSpans = list[tuple[int, int]]


def conversation_ids(tokenizer: Any, chat_template: str,
                     records: Sequence[Mapping[str, Any]]) -> tuple[list[list[int]], list[TokenSpans]]:
    """Each conversation's token ids (the rendered text, tokenized as one) and the spans of them that are
    trained: the tokens that start inside an assistant turn's characters (``chat.trained_spans``)."""
    rendered = [trained_spans(tokenizer, chat_template, r["messages"], r.get("tools")) if "messages" in r
                else trained_spans(tokenizer, chat_template, alpaca_messages(r)) for r in records]
    texts = [text for text, _ in rendered]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], [_token_spans([begin for begin, _ in offsets], spans)
                                      for (_, spans), offsets in zip(rendered, encoded["offset_mapping"])]
    ids, token_spans = [], []  # a slow tokenizer has no offsets: each span is tokenized on its own
    for text, spans in rendered:
        cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
        text_ids: list[int] = []
        trained: TokenSpans = []
        for begin, end in zip(cuts, cuts[1:]):
            piece = tokenizer(text[begin:end], add_special_tokens=False)["input_ids"]
            if any(start <= begin < stop for start, stop in spans):
                trained.append((len(text_ids), len(text_ids) + len(piece)))
            text_ids += piece
        ids.append(text_ids)
        token_spans.append(trained)
    return ids, token_spans


def _token_spans(begins: list[int], spans: Sequence[tuple[int, int]]) -> TokenSpans:
    """The tokens that start inside each character span ``[start, end)``, as token index ranges. Token starts
    only grow along a text, so each span's tokens are one range, found by bisection; where they do not (no
    tokenizer known here does that), each token is tested on its own."""
    if begins == sorted(begins):
        return [(bisect_left(begins, start), bisect_left(begins, end)) for start, end in spans]
    trained = [index for index, begin in enumerate(begins) if any(start <= begin < end for start, end in spans)]
    return [(index, index + 1) for index in trained]


def joined_ids(tokenizer: Any, prompts: Sequence[str], texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each text's token ids, and how many of them belong to its prompt (a prefix of the text).

    A fast tokenizer's character offsets say which tokens start inside the prompt (a token that spans
    the boundary counts as prompt, so the trained span never starts mid-token); a slow one falls back to
    the prompt's own token count, as the Alpaca recipe does."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], [_prompt_tokens(offsets, len(prompt))
                                      for prompt, offsets in zip(prompts, encoded["offset_mapping"])]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return ids, [len(p) for p in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def _prompt_tokens(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """Tokens before the first one that starts at or after the prompt's end."""
    for index, (start, _end) in enumerate(offsets):
        if start >= prompt_chars:
            return index
    return len(offsets)
