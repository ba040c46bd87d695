"""Chat data: OpenAI-style ``messages`` and ShareGPT ``conversations`` records, and the chat templates.

A conversation is a list of ``{"role", "content"}`` turns (roles ``system``, ``user``,
``assistant``, ``tool``), whatever the file's format. It is rendered to text with a
chat template, the same Jinja template Hugging Face tokenizers carry as
``chat_template`` and ``apply_chat_template`` renders: the model's own when its
tokenizer has one, or a named one from ``CHAT_TEMPLATES``. The template a run
trained with is saved in its export's tokenizer, so ``raytune-it serve`` renders
``/v1/chat/completions`` requests exactly as training rendered the conversations.

OpenAI's chat fine-tuning format is read in full (``messages_record``): content as a
list of text parts, the ``developer`` role (a system turn to a chat template),
assistant turns that call tools (``tool_calls``, content null), ``tool`` turns, a
top-level ``tools`` list (rendered through the template's own tool support, as
``apply_chat_template(tools=...)`` does), and the per-message ``weight``.

Every assistant turn is trained (its text and the template's end of turn) unless its
``weight`` is 0; every other part is masked: system, user and tool turns and the
template's own text. The trained spans come from rendering: the text before an
assistant turn is the conversation up to it rendered with the generation prompt, and
the turn ends where the conversation rendered through it ends.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

ROLES = ("system", "user", "assistant", "tool")
#: Roles a file may use that a chat template knows by another name: OpenAI's ``developer`` is the system turn.
ROLE_ALIASES = {"developer": "system"}
#: ShareGPT's speaker names, mapped to roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}

#: Named templates for models whose tokenizer has none (or to override it): ``data.template``.
CHAT_TEMPLATES = {
    # OpenAI's ChatML, as Qwen2 uses it; tools and tool calls as Qwen2.5 and Hermes render them (the tool list
    # in the system turn, each call a <tool_call> JSON object, each result a <tool_response> in a user turn).
    "chatml": (
        "{% if tools %}{{ '<|im_start|>system\n' }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
        "with function signatures within <tools></tools> XML tags:\n<tools>' }}"
        "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
        "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and tools %}"
        "{% elif message['role'] == 'tool' %}"
        "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
        "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
        "{{ '<|im_start|>assistant\n' + (message['content'] + '\n' if message['content'] else '') }}"
        "{% for call in message['tool_calls'] %}{% if not loop.first %}{{ '\n' }}{% endif %}"
        "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": '"
        " + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}"
        "{{ '<|im_end|>\n' }}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endif %}{% endfor %}"
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


def renders_tools(source: str) -> bool:
    """Whether a chat template renders tools: it reads the ``tools`` list and each turn's ``tool_calls``."""
    return "tool_calls" in source and "tools" in source


def content_text(content: Any, what: str) -> str:
    """A turn's content as text: a string, or OpenAI's list of text parts (``{"type": "text", "text": ...}``),
    joined with newlines as serving joins them. ValueError names the part that is not text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{what}: content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for number, part in enumerate(content, start=1):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"{what}: content part {number} ({kind!r}) is not a text part "
                             "{'type': 'text', 'text': ...}; a text model trains on text only")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(calls: Any, what: str) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` as chat templates take them: ``arguments`` parsed from its JSON string."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{what}: tool_calls must be a non-empty list")
    checked = []
    for number, call in enumerate(calls, start=1):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{what}: tool call {number} needs a function with a name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ValueError(f"{what}: tool call {number}: arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{what}: tool call {number}: arguments must be a JSON object")
        checked.append({**call, "type": call.get("type", "function"),
                        "function": {"name": function["name"], "arguments": arguments}})
    return checked


def _openai_turn(turn: Any, number: int) -> dict[str, Any]:
    """One turn of OpenAI's chat fine-tuning format, normalised for a chat template (see the module docstring);
    other keys (``name``, ``tool_call_id``) are kept."""
    what = f"turn {number}"
    if not isinstance(turn, Mapping) or "role" not in turn:
        raise ValueError(f"{what}: expected an object with 'role' and 'content'")
    role = ROLE_ALIASES.get(turn["role"], turn["role"])
    checked = {**turn, "role": role}
    if turn.get("tool_calls") is not None and role != "assistant":
        raise ValueError(f"{what}: only an assistant turn may have tool_calls (this is a {turn['role']} turn)")
    if role == "assistant" and turn.get("tool_calls") is not None:
        checked["tool_calls"] = _tool_calls(turn["tool_calls"], what)
        checked["content"] = "" if turn.get("content") is None else content_text(turn["content"], what)
    elif "content" not in turn:
        raise ValueError(f"{what}: expected an object with 'role' and 'content'")
    else:
        checked["content"] = content_text(turn["content"], what)
    if "weight" in turn:
        if role != "assistant" or turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise ValueError(f"{what}: weight must be 0 or 1, on an assistant turn (got {turn['weight']!r} on a "
                             f"{turn['role']} turn)")
    return checked


def trained(turn: Mapping[str, Any]) -> bool:
    """Whether an assistant turn is trained: OpenAI's ``weight`` 0 leaves it in the prompt, masked."""
    return turn["role"] == "assistant" and turn.get("weight", 1) == 1


def uses_tools(messages: Sequence[Mapping[str, Any]], tools: Any) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def _checked_turns(turns: list[dict[str, Any]], ends_on_answer: bool = True) -> list[dict[str, Any]]:
    """A conversation that trains: known roles, string contents, non-empty assistant turns (or tool calls),
    at least one trained one, and an end on one (a conversation that ends on a user turn has no answer to
    learn). A prompt for generation (``ends_on_answer=False``) may end on any turn."""
    for number, turn in enumerate(turns, start=1):
        if turn["role"] not in ROLES:
            raise ValueError(f"turn {number}: unknown role {turn['role']!r}; allowed: "
                             f"{', '.join([*ROLES, *ROLE_ALIASES])}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"turn {number}: content must be a string, got {type(turn['content']).__name__}")
        if turn["role"] == "assistant" and not turn["content"].strip() and not turn.get("tool_calls"):
            raise ValueError(f"turn {number}: the assistant turn is empty: there is nothing to train on")
        if turn["role"] == "system" and number != 1:
            raise ValueError(f"turn {number}: a system turn may only come first")
    if not turns:
        raise ValueError("the conversation has no turns")
    if ends_on_answer and turns[-1]["role"] != "assistant":
        raise ValueError(f"the conversation ends on a {turns[-1]['role']} turn; it must end on an assistant turn")
    if ends_on_answer and not any(trained(turn) for turn in turns):
        raise ValueError("every assistant turn has weight 0: there is nothing to train on")
    return turns


def _conversation(raw: Any, turns_key: str, speaker_key: str, text_key: str, roles: Mapping[str, str],
                  what: str, ends_on_answer: bool) -> dict[str, Any]:
    """A record's turns as ``{"role", "content"}``, checked (``_checked_turns``); ``roles`` maps the file's
    speaker names to roles. The record's other fields (an id, a task family) are kept beside ``messages``."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get(turns_key), list):
        raise ValueError(f"expected an object with a {turns_key!r} list of {what} turns")
    turns = []
    for number, turn in enumerate(raw[turns_key], start=1):
        if not isinstance(turn, Mapping) or speaker_key not in turn or text_key not in turn:
            raise ValueError(f"turn {number}: expected an object with {speaker_key!r} and {text_key!r}")
        speaker = turn[speaker_key]
        if speaker not in roles:
            raise ValueError(f"turn {number}: unknown speaker {speaker!r}; allowed: {', '.join(roles)}")
        turns.append({"role": roles[speaker], "content": turn[text_key]})
    others = {key: value for key, value in raw.items() if key not in (turns_key, "messages")}
    return {**others, "messages": _checked_turns(turns, ends_on_answer)}


def messages_record(raw: Any, ends_on_answer: bool = True) -> dict[str, Any]:
    """``{"messages": [...], "tools": [...]}``: OpenAI's chat fine-tuning format, in full (the module docstring)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("messages"), list):
        raise ValueError("expected an object with a 'messages' list of {role, content} turns")
    turns = [_openai_turn(turn, number) for number, turn in enumerate(raw["messages"], start=1)]
    tools = raw.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, Mapping) and isinstance(t.get("function"), Mapping) for t in tools)):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {name, description, parameters}}")
    return {**raw, "messages": _checked_turns(turns, ends_on_answer)}


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


def render(tokenizer: Any, source: str, messages: list[dict[str, Any]], *, generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as text, rendered by transformers' own chat-template renderer."""
    return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                         add_generation_prompt=generation_prompt, tools=tools or None)


def check_tool_support(source: str, messages: Sequence[Mapping[str, Any]], tools: Any) -> None:
    """A conversation with tools needs a template that renders them; one that does not would silently drop
    the calls (and train an empty answer). ValueError says which templates do."""
    if uses_tools(messages, tools) and not renders_tools(source):
        named = [name for name, template in CHAT_TEMPLATES.items() if renders_tools(template)]
        raise ValueError("the conversation uses tools (tool_calls, tool turns or a tools list) but the chat template "
                         "does not render them; use a model whose template has tool support or set data.template="
                         f"{' or '.join(named)}")


def trained_spans(tokenizer: Any, source: str, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns (each with the
    template's end of turn). Raises ValueError if the template does not render each turn as a prefix of the
    next, or cannot render the conversation's tools."""
    check_tool_support(source, messages, tools)
    text = render(tokenizer, source, messages, tools=tools)
    spans = []
    for index, turn in enumerate(messages):
        if not trained(turn):
            continue
        before = render(tokenizer, source, messages[:index], generation_prompt=True, tools=tools) if index else ""
        through = render(tokenizer, source, messages[:index + 1], tools=tools)
        if not text.startswith(before) or not text.startswith(through) or len(through) < len(before):
            raise ValueError("the chat template does not render each turn as a prefix of the next; choose another "
                             f"data.template ({', '.join(CHAT_TEMPLATES)})")
        spans.append((len(before), len(through)))
    return text, spans
