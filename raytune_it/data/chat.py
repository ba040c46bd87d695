"""Chat data: OpenAI-style ``messages`` and ShareGPT ``conversations`` records, and the chat templates.

A conversation is a list of ``{"role", "content"}`` turns (roles ``system``, ``user``,
``assistant``, ``tool``), whatever the file's format. It is rendered to text with a
chat template, the same Jinja template Hugging Face tokenizers carry as
``chat_template`` and ``apply_chat_template`` renders: the model's own when its
tokenizer has one, or a named one from ``CHAT_TEMPLATES``. The template a run
trained with is saved in its export's tokenizer, so ``raytune-it serve`` renders
``/v1/chat/completions`` requests exactly as training rendered the conversations.

Every assistant turn is trained (its text and the template's end of turn), every
other part is masked: system, user and tool turns and the template's own text.
The trained spans come from rendering: the text before an assistant turn is the
conversation up to it rendered with the generation prompt, and the turn ends where
the conversation rendered through it ends.
"""

from __future__ import annotations

from typing import Any, Mapping

ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT's speaker names, mapped to roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}

#: Named templates for models whose tokenizer has none (or to override it): ``data.template``.
CHAT_TEMPLATES = {
    # OpenAI's ChatML, as Qwen2 uses it.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta's Llama 3 instruct format (BOS comes from the tokenizer, not from the template).
    "llama-3": (
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Meta's Llama 2 chat format: the system prompt inside the first [INST], every exchange closed by EOS.
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
        "{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{% else %}{% if not loop.first %}{{ bos_token }}{% endif %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% endif %}{% endfor %}"
    ),
    # The Alpaca prompt, turn after turn, for models that know no chat format.
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] != 'system' %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% endif %}{% endfor %}"
    ),
}


def _checked_turns(turns: list[dict[str, Any]], ends_on_answer: bool = True) -> list[dict[str, str]]:
    """A conversation that trains: known roles, string contents, a non-empty assistant turn, and an end on
    one (a conversation that ends on a user turn has no answer to learn). A prompt for generation
    (``ends_on_answer=False``) may end on any turn."""
    for number, turn in enumerate(turns, start=1):
        if turn["role"] not in ROLES:
            raise ValueError(f"turn {number}: unknown role {turn['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"turn {number}: content must be a string, got {type(turn['content']).__name__}")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise ValueError(f"turn {number}: the assistant turn is empty: there is nothing to train on")
        if turn["role"] == "system" and number != 1:
            raise ValueError(f"turn {number}: a system turn may only come first")
    if not turns:
        raise ValueError("the conversation has no turns")
    if ends_on_answer and turns[-1]["role"] != "assistant":
        raise ValueError(f"the conversation ends on a {turns[-1]['role']} turn; it must end on an assistant turn")
    return turns


def _conversation(raw: Any, turns_key: str, speaker_key: str, text_key: str, roles: Mapping[str, str] | None,
                  what: str, ends_on_answer: bool) -> dict[str, Any]:
    """A record's turns as ``{"role", "content"}``, checked (``_checked_turns``); ``roles`` maps the file's
    speaker names to roles (None: they are the roles). The record's other fields (an id, a task family)
    are kept beside ``messages``."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get(turns_key), list):
        raise ValueError(f"expected an object with a {turns_key!r} list of {what} turns")
    turns = []
    for number, turn in enumerate(raw[turns_key], start=1):
        if not isinstance(turn, Mapping) or speaker_key not in turn or text_key not in turn:
            raise ValueError(f"turn {number}: expected an object with {speaker_key!r} and {text_key!r}")
        speaker = turn[speaker_key]
        if roles is not None and speaker not in roles:
            raise ValueError(f"turn {number}: unknown speaker {speaker!r}; allowed: {', '.join(roles)}")
        turns.append({"role": roles[speaker] if roles is not None else speaker, "content": turn[text_key]})
    others = {key: value for key, value in raw.items() if key not in (turns_key, "messages")}
    return {**others, "messages": _checked_turns(turns, ends_on_answer)}


def messages_record(raw: Any, ends_on_answer: bool = True) -> dict[str, Any]:
    """``{"messages": [{"role", "content"}, ...]}``, as OpenAI's fine-tuning files are."""
    return _conversation(raw, "messages", "role", "content", None, "{role, content}", ends_on_answer)


def sharegpt_record(raw: Any, ends_on_answer: bool = True) -> dict[str, Any]:
    """``{"conversations": [{"from", "value"}, ...]}``, as ShareGPT exports and LLaMA-Factory's sharegpt format."""
    return _conversation(raw, "conversations", "from", "value", SHAREGPT_ROLES, "{from, value}", ends_on_answer)


def alpaca_messages(record: Mapping[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as a conversation, for a chat template: the instruction, then the input, as the user's turn."""
    extra = (record.get("input") or "").strip()
    user = record["instruction"] + (f"\n\n{extra}" if extra else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def template_source(tokenizer: Any, data: Any) -> str | None:
    """The chat template a run trains with (``data`` is its DataSection): a named ``data.template``, or for
    ``auto`` the tokenizer's own; conversations on a tokenizer without one get the Alpaca chat template.
    None: Alpaca records with the Alpaca prompt, which is also what serve falls back to."""
    if data.template != "auto":
        return CHAT_TEMPLATES[data.template]
    own = getattr(tokenizer, "chat_template", None) or None
    if own is None and data.format != "alpaca":
        return CHAT_TEMPLATES["alpaca"]
    return own


def render(tokenizer: Any, source: str, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    """The conversation as text, rendered by transformers' own chat-template renderer."""
    return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def trained_spans(tokenizer: Any, source: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each with the template's
    end of turn). Raises ValueError if the template does not render each turn as a prefix of the next."""
    text = render(tokenizer, source, messages)
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, source, messages[:index], generation_prompt=True) if index else ""
        through = render(tokenizer, source, messages[:index + 1])
        if not text.startswith(before) or not text.startswith(through) or len(through) < len(before):
            raise ValueError("the chat template does not render each turn as a prefix of the next; choose another "
                             f"data.template ({', '.join(CHAT_TEMPLATES)})")
        spans.append((len(before), len(through)))
    return text, spans
