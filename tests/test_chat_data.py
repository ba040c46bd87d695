"""Chat data: messages and ShareGPT records, multi-turn masking under every named template, bad
conversations, and the same token ids in training and in serve's chat rendering."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_it.config import load_config
from raytune_it.data.chat import CHAT_TEMPLATES
from raytune_it.data.pipeline import iter_examples
from raytune_it.data.prompt_format import PromptFormat
from raytune_it.data.records import ReadReport, iter_records
from raytune_it.data.tokenize import IGNORE_INDEX, tokenize_records
from raytune_it.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Convert 2 hours to minutes."},
    {"role": "assistant", "content": "2 hours is 120 minutes."},
    {"role": "user", "content": "And 3 hours?"},
    {"role": "assistant", "content": "3 hours is 180 minutes."},
]
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]],
                               "value": t["content"]} for t in CONVERSATION]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_messages_and_sharegpt_files_read_as_the_same_conversation(tmp_path):
    messages = _jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}])
    array = tmp_path / "s.json"
    array.write_text(json.dumps([SHAREGPT]))
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CONVERSATION}]), parquet)
    read = [list(iter_records(messages, record_format="messages")),
            list(iter_records(array, record_format="sharegpt")),
            list(iter_records(parquet, record_format="messages"))]
    assert all(records == [{"messages": CONVERSATION}] for records in read)


@pytest.mark.parametrize("bad,reason", [
    ([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], "turn 1: unknown role 'narrator'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "turn 2: the assistant turn is empty"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
     "the conversation ends on a user turn"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}],
     "turn 1: content part 1 ('str') is not a text part"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}],
     "turn 1: content must be a string or a list of text parts"),
])
def test_bad_conversations_name_file_and_line_or_are_skipped_and_counted(tmp_path, bad, reason):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": bad}])
    with pytest.raises(DataError) as err:
        list(iter_records(path, record_format="messages"))
    assert f"{path}:2: {reason}" in str(err.value)
    report = ReadReport()
    kept = list(iter_records(path, skip_bad_records=True, report=report, record_format="messages"))
    assert len(kept) == 1 and report.bad_records == 1 and report.reasons[0].startswith(f"{path}:2:")


def _runs(labels):
    """Runs of consecutive trained positions."""
    runs, current = [], []
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(index)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", list(CHAT_TEMPLATES))
def test_every_assistant_turn_is_trained_and_everything_else_masked(tokenizer, template):
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 512, chat_template=CHAT_TEMPLATES[template])
    ids, labels = example["input_ids"], example["labels"]
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHAT_TEMPLATES[template], tokenize=False)
    assert ids == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id], "the conversation is tokenized as one text"
    runs = _runs(labels)
    assert len(runs) == 2, "one trained run per assistant turn (the final EOS joins the last)"
    for run, answer in zip(runs, ["2 hours is 120 minutes.", "3 hours is 180 minutes."]):
        trained = tokenizer.decode([ids[i] for i in run])
        assert answer in trained
        for other in ("Convert 2 hours", "And 3 hours", "one short sentence"):
            assert other not in trained, "system and user turns are masked"


def test_alpaca_records_keep_the_alpaca_prompt_unless_a_template_is_named(tokenizer):
    record = {"instruction": "Convert 2 hours to minutes.", "input": "", "output": "120 minutes."}
    plain = tokenize_records([record], tokenizer, 512)
    chat = tokenize_records([record], tokenizer, 512, chat_template=CHAT_TEMPLATES["chatml"])
    assert tokenizer.decode(plain[0]["input_ids"]).count("### Instruction:") == 1
    assert "<|im_start|>user" in tokenizer.decode(chat[0]["input_ids"])


@pytest.mark.parametrize("template", ["chatml", "llama-3"])
def test_serve_builds_the_prompt_ids_training_built_for_the_same_conversation(tokenizer, tmp_path, template):
    """The template a run trains with is recorded in its export's tokenizer, and serve's chat rendering (the
    PromptBuilder both engines use) gives the ids training gave, up to the answer it is asked to generate."""
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.serving.engines.base import GenerationRequest, PromptBuilder

    config = load_config("tiny-lora", ["data.format=messages", f"data.template={template}"], check_paths=False)
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 512,
                                 chat_template=CHAT_TEMPLATES[template])
    trained_tokenizer = load_tokenizer("tiny-llama")
    PromptFormat.for_run(trained_tokenizer, config.data).record_on(trained_tokenizer)
    trained_tokenizer.save_pretrained(tmp_path / "export")  # what the strategies' export does
    served = load_tokenizer(str(tmp_path / "export"))
    assert served.chat_template == CHAT_TEMPLATES[template]
    request = GenerationRequest(model="m", messages=CONVERSATION[:-1], max_tokens=8)
    from_base = PromptBuilder(served, 2048).ids(request)
    last_answer = _runs(example["labels"])[-1][0]
    assert from_base == example["input_ids"][:last_answer]
    # An adapter served on a base without that template renders with the template saved beside it.
    request.adapter_folder = str(tmp_path / "export")
    assert PromptBuilder(load_tokenizer("tiny-llama"), 2048).ids(request) == from_base


def test_the_pipeline_reads_and_trains_sharegpt_data_with_the_models_template(tmp_path, tokenizer):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([SHAREGPT] * 4))
    config = load_config("tiny-lora", [f"data.path={path}", "data.format=sharegpt", "data.eval_fraction=0"])
    examples = list(iter_examples(config.data, tokenizer, 512, "train", 0))
    assert len(examples) == 4 and len(_runs(examples[0]["labels"])) == 2
    # tiny-llama has no chat template of its own: conversations get the Alpaca chat template
    assert "### Instruction:\nAnd 3 hours?" in tokenizer.decode(examples[0]["input_ids"])


# --- OpenAI's chat fine-tuning format, in full --------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CONVERSATION = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "You are terse."},
                                          {"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "I think it rains.", "weight": 0},
        {"role": "user", "content": "Check, please."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"sky\": \"clear\"}"},
        {"role": "assistant", "content": [{"type": "text", "text": "Clear skies in Oslo."}], "weight": 1},
    ]}


def test_openai_fine_tuning_records_are_read_in_full(tmp_path):
    """Text parts, the developer role, tool calls with null content, tool turns, a tools list and weights:
    what OpenAI's chat fine-tuning files hold, read as a conversation a chat template renders."""
    [record] = iter_records(_jsonl(tmp_path / "openai.jsonl", [TOOL_CONVERSATION]), record_format="messages")
    turns = record["messages"]
    assert turns[0] == {"role": "system", "content": "You are terse.\nUse tools."}
    assert turns[4]["content"] == "" and turns[4]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": {"city": "Oslo"}}
    assert turns[5]["role"] == "tool" and turns[5]["tool_call_id"] == "call_1"
    assert turns[6]["content"] == "Clear skies in Oslo." and record["tools"] == [WEATHER_TOOL]


def test_tool_calls_are_trained_weight_zero_turns_and_tool_results_masked(tokenizer):
    """Under the chatml template (Qwen2.5's tool format): the tool list is in the prompt, the call and the
    final answer are trained, the weight-0 answer, the tool's result and the user turns are not."""
    from raytune_it.data.chat import messages_record

    record = messages_record(TOOL_CONVERSATION)
    [example] = tokenize_records([record], tokenizer, 2048, chat_template=CHAT_TEMPLATES["chatml"])
    ids, labels = example["input_ids"], example["labels"]
    text = tokenizer.decode(ids)
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_response>" in text
    runs = [tokenizer.decode([ids[i] for i in run]) for run in _runs(labels)]
    assert len(runs) == 2, runs
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in runs[0]
    assert "Clear skies in Oslo." in runs[1]
    for masked in ("I think it rains.", "clear\"}", "Check, please.", "get_weather\", \"description"):
        assert not any(masked in run for run in runs), masked
    # Generation renders the same prompt, tools included, up to the answer it is asked for.
    prompt_format = PromptFormat(tokenizer, CHAT_TEMPLATES["chatml"])
    prompt = prompt_format.prompt_ids({"messages": record["messages"][:-1], "tools": record["tools"]})
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("change,reason", [
    (lambda r: r["messages"][2].update(weight=2), "turn 3: weight must be 0 or 1, on an assistant turn"),
    (lambda r: r["messages"][1].update(weight=0), "turn 2: weight must be 0 or 1, on an assistant turn"),
    (lambda r: [m.update(weight=0) for m in r["messages"] if m["role"] == "assistant"],
     "every assistant turn has weight 0: there is nothing to train on"),
    (lambda r: r["messages"][4]["tool_calls"][0]["function"].update(arguments="{city"),
     "turn 5: tool call 1: arguments is not valid JSON"),
    (lambda r: r["messages"][1].update(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
     "turn 2: content part 1 ('image_url') is not a text part"),
    (lambda r: r.update(tools="get_weather"), "tools must be a list of"),
    (lambda r: r["messages"][1].update(tool_calls=r["messages"][4]["tool_calls"]),
     "turn 2: only an assistant turn may have tool_calls"),
])
def test_bad_openai_records_name_their_line(tmp_path, change, reason):
    bad = json.loads(json.dumps(TOOL_CONVERSATION))
    change(bad)
    path = _jsonl(tmp_path / "openai.jsonl", [TOOL_CONVERSATION, bad])
    with pytest.raises(DataError, match=f"{path}:2: ") as err:
        list(iter_records(path, record_format="messages"))
    assert reason in str(err.value)


def test_tools_on_a_template_without_tool_support_are_refused_naming_the_fix(tmp_path, tokenizer):
    """The Alpaca and Llama templates do not render tool calls: training on them would drop the calls and learn
    an empty answer, so the run is refused before it starts, naming data.template=chatml."""
    path = _jsonl(tmp_path / "tools.jsonl", [TOOL_CONVERSATION])
    config = load_config("tiny-lora", [f"data.path={path}", "data.format=messages", "data.eval_fraction=0"])
    with pytest.raises(DataError, match=f"{path}: the conversation uses tools .*data.template=chatml"):
        list(iter_examples(config.data, tokenizer, 512, "train", 0))
    chatml = load_config("tiny-lora", [f"data.path={path}", "data.format=messages", "data.eval_fraction=0",
                                       "data.template=chatml"])
    assert len(list(iter_examples(chatml.data, tokenizer, 2048, "train", 0))) == 1


def test_trained_token_spans_are_the_tokens_that_start_inside_each_answer():
    """Token starts that grow along the text give one range per answer (bisection); any other order falls
    back to testing each token, with the same result as that test over every token."""
    from raytune_it.data.prompt_format import _token_spans

    begins, answers = [0, 2, 5, 9, 12, 15], [(2, 6), (12, 20)]
    assert _token_spans(begins, answers) == [(1, 3), (4, 6)]
    assert _token_spans(begins, [(3, 4)]) == [(2, 2)], "no token starts inside: an empty range"
    shuffled = [0, 5, 2, 9, 15, 12]
    trained = {i for span in _token_spans(shuffled, answers) for i in range(*span)}
    assert trained == {i for i, begin in enumerate(shuffled) if any(s <= begin < e for s, e in answers)}
