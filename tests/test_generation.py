"""Generation after tuning: one prompt format for training, eval, generate and serve; batched engines that
answer as batch 1 does; ``raytune-it generate`` on Ray Data into a bucket; the three effects on a user's file."""

import asyncio
import json

import pytest

from raytune_it.config import load_config

RECORD = {"instruction": "Convert 2 hours to minutes.", "input": "", "output": "2 hours is 120 minutes."}


def _untrained_adapter(folder, base: str, config):
    """A real peft adapter on ``base``, exported as a run exports it: its tokenizer carries the run's format."""
    from peft import LoraConfig, get_peft_model

    from raytune_it.data.prompt_format import PromptFormat
    from raytune_it.models.loading import load_causal_lm, load_tokenizer

    model = get_peft_model(load_causal_lm(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                            task_type="CAUSAL_LM"))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = load_tokenizer(base)
    PromptFormat.for_run(tokenizer, config.data).record_on(tokenizer)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("base,template", [("tiny-qwen2", "auto"), ("tiny-llama", "llama-3")])
def test_eval_generate_and_serve_build_the_ids_training_built(tmp_path, base, template):
    """The prompt of a trained record (its masked prefix) is what eval and generate (the Answerer) and both
    serving engines (the PromptBuilder) send, for a chat model's own template and for a named one."""
    from raytune_it.data.pipeline import iter_examples
    from raytune_it.data.tokenize import IGNORE_INDEX
    from raytune_it.generation.answers import Answerer, Sampling, resolve_models
    from raytune_it.serving.engines.base import GenerationRequest, PromptBuilder

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(RECORD) + "\n")
    config = load_config("tiny-lora", [f"model.name_or_path={base}", f"data.path={data}", f"data.template={template}",
                                       "data.eval_fraction=0"])
    [example] = list(iter_examples(config.data, _tokenizer(base), 512, "train", 0))
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    trained_prompt = example["input_ids"][:first_trained]
    adapter = _untrained_adapter(tmp_path / "export", base, config)

    entries = resolve_models(base, {"base": base, "tuned": adapter}, "eval.models")
    answerer = Answerer(config.serve, config.data, 2, entries)
    try:
        for entry in entries:
            prompt_format = answerer.prompt_format(entry)
            assert prompt_format.prompt_ids({k: v for k, v in RECORD.items() if k != "output"}) == trained_prompt
            [[answer]] = list(answerer.answers(entry, [RECORD], Sampling(4)))
            assert answer.prompt_tokens == len(trained_prompt), entry.name
            assert prompt_format.text_ids(answer.prompt) == trained_prompt
    finally:
        answerer.close()
    served = PromptBuilder(_tokenizer(base), 2048).ids(GenerationRequest(
        model="tuned", messages=[{"role": "user", "content": RECORD["instruction"]}], adapter_folder=adapter))
    assert served == trained_prompt


def _tokenizer(name):
    from raytune_it.models.loading import load_tokenizer

    return load_tokenizer(name)


def test_a_chat_template_end_of_turn_ends_the_answer():
    from raytune_it.data.chat import CHAT_TEMPLATES
    from raytune_it.data.prompt_format import PromptFormat

    tokenizer = _tokenizer("tiny-llama")
    assert PromptFormat(tokenizer, None).stop_strings == []
    assert PromptFormat(tokenizer, CHAT_TEMPLATES["chatml"]).stop_strings == ["<|im_end|>"]
    assert PromptFormat(tokenizer, CHAT_TEMPLATES["llama-3"]).stop_strings == ["<|eot_id|>"]
    assert PromptFormat(tokenizer, CHAT_TEMPLATES["llama-2"]).stop_strings == []  # EOS ends its turns
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    with_token = PromptFormat(tokenizer, CHAT_TEMPLATES["chatml"])
    assert with_token.stop_strings == [] and with_token.stop_token_ids == [
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_batched_greedy_answers_equal_batch_one_token_for_token(tmp_path):
    """The transformers engine's batch (left padding, transformers' generate) against its own batch-1 decode
    loop, on prompts of different lengths, for the base and an adapter, with a stop string in one."""
    from helpers import train_tiny_adapter
    from raytune_it.data.synthetic import generate
    from raytune_it.data.templates import render_prompt
    from raytune_it.models.loading import resolve_model_path
    from raytune_it.serving.engines.base import GenerationRequest
    from raytune_it.serving.engines.transformers_engine import TransformersEngine

    adapter = str(train_tiny_adapter(tmp_path / "a", ["dosage", "bmi"], steps=8))
    config = load_config("tiny-lora", ["serve.max_model_len=512"])
    engine = TransformersEngine(config.serve, resolve_model_path("tiny-llama"), "tiny-llama")
    engine.load_adapter("a", adapter)
    prompts = [render_prompt(r) for r in generate(6, seed=4)] + ["Hello"]
    assert len({len(engine.tokenizer(p)["input_ids"]) for p in prompts}) > 3, "prompts of different lengths"
    texts, stopped = set(), 0
    for model, folder in (("tiny-llama", None), ("a", adapter)):
        requests = [GenerationRequest(model=model, prompt=p, max_tokens=20, temperature=0, adapter_folder=folder,
                                      stop=["kg kg", "52"] if i % 2 else []) for i, p in enumerate(prompts)]
        alone = [asyncio.run(engine.generate(r)) for r in requests]
        batched = asyncio.run(engine.generate_batch(requests))
        assert [r.text for r in batched] == [r.text for r in alone]
        assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
        assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
        texts |= {r.text for r in batched}
        stopped += sum(r.finish_reason == "stop" for r in batched)
    assert len(texts) > 1 and stopped, "different answers, some cut by a stop string"


@pytest.mark.integration
def test_generate_writes_a_row_per_input_to_a_bucket_on_two_actors_and_resumes(tmp_path, s3_storage, empty_cwd):
    from helpers import train_tiny_adapter
    from raytune_it.data.synthetic import generate as records
    from raytune_it.generation.offline import block_file, generate
    from raytune_it.storage import open_location

    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"### Instruction:\n{r['instruction']}\n\n### Response:\n"} for r in records(10, seed=2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = train_tiny_adapter(tmp_path / "adapter", ["dosage"], steps=2)
    config = load_config("tiny-lora", [
        f"data.path={data}", "data.format=prompt", f"run.storage={s3_storage}", "run.name=gen",
        f'generate.models={json.dumps({"base": "tiny-llama", "medicine": str(adapter)})}',
        "generate.block_rows=4", "generate.num_actors=2", "generate.max_new_tokens=6", "generate.output_format=jsonl"])
    first = generate(config)
    assert (first.blocks, first.blocks_skipped, first.rows_written) == (3, 0, 20)
    output = open_location(s3_storage) / "gen" / "generations"

    def read(model):
        return [json.loads(line) for block in range(3)
                for line in block_file(output, model, block, "jsonl").read_text().splitlines()]

    for model in ("base", "medicine"):
        got = read(model)
        assert [r["id"] for r in got] == list(range(10)) and [r["prompt"] for r in got] == [r["prompt"] for r in rows]
        assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" and r["prompt_tokens"] > 0
                   for r in got)
        assert set(got[0]) == {"id", "model", "prompt", "completion", "prompt_tokens", "completion_tokens",
                               "finish_reason", "error"}
    assert [r["completion"] for r in read("base")] != [r["completion"] for r in read("medicine")]
    # An interrupted run: block 1 of the adapter was in flight, never written. A re-run does only that block.
    kept = block_file(output, "base", 0, "jsonl").read_text()
    missing = block_file(output, "medicine", 1, "jsonl")
    missing.filesystem.delete_file(missing.path)
    second = generate(config)
    assert (second.blocks_skipped, second.rows_written) == (5, 4)
    assert block_file(output, "base", 0, "jsonl").read_text() == kept
    assert [r["id"] for r in read("medicine")] == list(range(10))
    # A changed job is not a resumed one: refused before Ray starts, naming what changed, and nothing is lost.
    from raytune_it.config.loading import with_overrides
    from raytune_it.errors import UserError

    data.write_text(data.read_text())  # the same records, written again: still the same job
    assert generate(config).blocks_skipped == 6
    for change, named in ((["generate.temperature=0.7"], "generate.temperature changed"),
                          ([f"data.path={tmp_path / 'other.jsonl'}"], "data.records changed"),
                          (["generate.block_rows=5"], "generate.block_rows changed")):
        (tmp_path / "other.jsonl").write_text(data.read_text().replace("Instruction", "Task"))
        with pytest.raises(UserError, match=f"holds 3 block\\(s\\) of another job: {named}"):
            generate(with_overrides(config, change))
    assert block_file(output, "base", 0, "jsonl").read_text() == kept


def test_generate_names_a_bad_input_record_by_file_and_line(tmp_path):
    from raytune_it.errors import DataError
    from raytune_it.generation.offline import input_blocks

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
    config = load_config("tiny-lora", [f"data.path={data}", "data.format=prompt"])
    with pytest.raises(DataError, match=f"{data}:2: expected an object with a non-empty string 'prompt'"):
        list(input_blocks(config))
    with pytest.raises(Exception, match="data.format=prompt: plain prompts have no answers to train on"):
        from raytune_it.train.preflight import preflight

        preflight(config)


@pytest.mark.integration
def test_the_three_effects_come_out_of_a_users_file_with_a_family_field(tmp_path):
    """A Dolly-shaped file (a category per record, categories of our choosing): held-out and domain
    families by value, eval's own domain adapter tuned on the file's records that are not eval examples."""
    from helpers import train_tiny_adapter
    from raytune_it.data.synthetic import generate
    from raytune_it.evaluation.driver import evaluate
    from raytune_it.evaluation.sets import record_key, training_keys

    data = tmp_path / "dolly.jsonl"
    renamed = {"dosage": "med_dose", "bmi": "med_bmi", "arithmetic": "math", "uppercase": "caps"}
    records = [dict({k: v for k, v in r.items() if k != "family"}, category=renamed[r["family"]])
               for r in generate(400, seed=8, families=list(renamed))]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    general = train_tiny_adapter(tmp_path / "general", ["dosage", "arithmetic", "bmi"], steps=6)
    config = load_config("tiny-lora", [
        f"run.storage={tmp_path / 'runs'}", "run.name=dolly", f"eval.data.path={data}", "eval.family_field=category",
        "eval.held_out_families=[caps]", "eval.domain=medicine", "eval.domain_families=[med_dose,med_bmi]",
        "eval.examples_per_family=3", "eval.max_new_tokens=8", "eval.train_steps=3", "eval.batch_size=4"])
    outcome = evaluate(config, models={"general": str(general)})
    assert outcome["seen_families"] == ["math", "med_bmi", "med_dose"] and outcome["held_out_families"] == ["caps"]
    effects = {e["name"]: e for e in outcome["effects"]}
    assert list(effects) == ["performance", "task generalization", "domain specialization"]
    assert effects["domain specialization"]["families"] == ["med_dose", "med_bmi"]  # as given
    assert (effects["domain specialization"]["model"], effects["domain specialization"]["baseline"]) == (
        "medicine", "general")
    assert all(len(outcome["eval_set"][f]) == 3 for f in ["math", "med_bmi", "med_dose", "caps"])
    # The domain adapter eval trained learned from the file's medicine records, none of them an eval example.
    eval_folder = tmp_path / "runs" / "dolly" / "eval"
    trained = training_keys([eval_folder / "train-medicine.jsonl"])
    scored = {record_key(r) for examples in outcome["eval_set"].values() for r in examples}
    assert trained and not trained & scored
    assert {json.loads(line)["category"] for line in (eval_folder / "train-medicine.jsonl").read_text().splitlines()} \
        == {"med_dose", "med_bmi"}
    assert (tmp_path / "runs" / "dolly-eval-medicine" / "export" / "adapter_config.json").is_file()
    saved = json.loads((eval_folder / "eval.json").read_text())
    assert saved["effects"] == outcome["effects"] and saved["family_field"] == "category"


def test_eval_on_a_users_file_names_what_is_wrong(tmp_path):
    from raytune_it.errors import ConfigError, DataError
    from raytune_it.evaluation.driver import evaluate

    with pytest.raises(ConfigError, match="eval.domain_families: name the domain's families"):
        load_config("tiny-lora", ["eval.data.path=builtin:tasks", "eval.data.path=/x.jsonl"], check_paths=False)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(dict(RECORD, category="a")) + "\n" + json.dumps(RECORD) + "\n")
    config = load_config("tiny-lora", [f"eval.data.path={data}", "eval.family_field=category",
                                       "eval.held_out_families=[a]", "eval.domain_families=[a]",
                                       f"run.storage={tmp_path}"])
    with pytest.raises(DataError, match=f"{data}:2: field 'category' \\(eval.family_field\\) is missing"):
        evaluate(config)
    # the key that skips a bad record of eval's file is eval.data's, not training's
    with pytest.raises(DataError, match="or set eval.data.skip_bad_records=true"):
        evaluate(config)
    data.write_text("")
    with pytest.raises(DataError, match=f"{data}: the file holds no records; there is nothing to evaluate"):
        evaluate(config)
