import io
import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytune_it.config import load_config
from raytune_it.data.pipeline import dataset_stats, iter_examples, split_of
from raytune_it.data.records import ReadReport, iter_records
from raytune_it.data.synthetic import DOMAINS, FAMILIES, generate
from raytune_it.data.templates import render_prompt
from raytune_it.data.tokenize import IGNORE_INDEX, collate, collate_arrow, pack_examples, tokenize_records
from raytune_it.errors import ConfigError, DataError

GOOD = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}


def write_jsonl(path, rows):
    path.write_bytes(b"".join((json.dumps(r).encode() if not isinstance(r, bytes) else r) + b"\n" for r in rows))
    return path


# --- templates and masking ------------------------------------------------------------------

def test_alpaca_template_with_and_without_input():
    with_input = render_prompt(GOOD)
    assert "### Input:\n2, 3\n\n### Response:\n" in with_input and "paired with an input" in with_input
    without = render_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_unmasked_labels_decode_to_exactly_response_plus_eos(tokenizer):
    records = list(generate(50, seed=3))
    examples = tokenize_records(records, tokenizer, max_seq_len=512)
    assert len(examples) == 50
    for record, example in zip(records, examples):
        trained = [label for label in example["labels"] if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == record["output"] + tokenizer.eos_token
        # the masked span is BOS + the rendered prompt
        masked = example["input_ids"][: len(example["labels"]) - len(trained)]
        assert tokenizer.decode(masked) == tokenizer.bos_token + render_prompt(record)
        assert example["labels"][: len(masked)] == [IGNORE_INDEX] * len(masked)


@pytest.mark.parametrize("style", ["sentencepiece", "byte-level"])
def test_trained_ids_are_those_of_the_prompt_plus_response_text(style):
    """With both tokenizer styles LLaMA models use (built here: SentencePiece-style Metaspace like LLaMA 2,
    byte-level BPE like LLaMA 3), an example's ids are the tokenization of the joined text, as inference
    sees it, and the labels train exactly the response's tokens and EOS."""
    from raytune_it.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(style, vocab_size=1024)
    records = list(generate(40, seed=5))
    examples = tokenize_records(records, tokenizer, max_seq_len=512)
    separately_differs = 0
    for record, example in zip(records, examples):
        prompt = render_prompt(record)
        joined = tokenizer(prompt + record["output"])["input_ids"]  # BOS from the tokenizer itself
        assert example["input_ids"] == joined + [tokenizer.eos_token_id]
        masked = len(tokenizer(prompt)["input_ids"])
        assert example["labels"] == [IGNORE_INDEX] * masked + example["input_ids"][masked:]
        assert tokenizer.decode(example["input_ids"][masked:-1]) == record["output"]
        separately = tokenizer(prompt)["input_ids"] + tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        separately_differs += separately != joined
    if style == "sentencepiece":  # what tokenizing apart did: a prefix-space token before every response
        assert separately_differs == len(records)


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 400}
    from raytune_it.data.tokenize import TokenizeStats

    stats = TokenizeStats()
    [example] = tokenize_records([long], tokenizer, max_seq_len=64, stats=stats)
    assert len(example["input_ids"]) == len(example["labels"]) == 64
    assert stats.truncated == 1 and stats.max_length == 64
    # a response entirely past the limit leaves nothing to train on: dropped and counted
    dropped = TokenizeStats()
    assert tokenize_records([long], tokenizer, max_seq_len=16, stats=dropped) == []
    assert dropped.dropped_no_response == 1


# --- packing --------------------------------------------------------------------------------

def test_packing_boundaries(tokenizer):
    examples = tokenize_records(list(generate(40, seed=5)), tokenizer, max_seq_len=128)
    rows = list(pack_examples(examples, max_seq_len=128))
    assert len(rows) < len(examples)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    rebuilt = []
    for row in rows:
        assert len(row["input_ids"]) <= 128 and len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        bounds = starts + [len(row["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            # every packed segment starts at BOS, whose label is masked: no loss across the boundary
            assert row["input_ids"][a] == tokenizer.bos_token_id and row["labels"][a] == IGNORE_INDEX
            rebuilt.append(row["input_ids"][a:b])
    assert rebuilt == [e["input_ids"] for e in examples]


def test_packed_examples_do_not_attend_across_boundaries(tokenizer, tiny_model_dir):
    import torch

    from raytune_it.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    first, second = tokenize_records(list(generate(2, seed=9)), tokenizer, max_seq_len=128)
    [row] = list(pack_examples([first, second], max_seq_len=256))
    batch = collate([row], pad_token_id=tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits
    n1, n2 = len(first["input_ids"]), len(second["input_ids"])
    torch.testing.assert_close(packed[0, n1:n1 + n2], alone[0], rtol=1e-4, atol=1e-4)
    # and the check has teeth: without position resets the second example sees the first
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(leaky[0, n1:n1 + n2], alone[0], atol=1e-3)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}],
                    pad_token_id=3)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist()[2:] == [IGNORE_INDEX] * 6


@pytest.mark.parametrize("packed", [False, True])
def test_arrow_collate_equals_the_row_collate(packed):
    import random

    rng = random.Random(7)
    rows = []
    for _ in range(11):
        n = rng.randint(1, 40)
        row = {"input_ids": [rng.randint(0, 2000) for _ in range(n)],
               "labels": [IGNORE_INDEX] * (n // 3) + [rng.randint(0, 2000) for _ in range(n - n // 3)]}
        if packed:
            row["position_ids"] = [i % 13 for i in range(n)]
        rows.append(row)
    columns = ["input_ids", "labels"] + (["position_ids"] if packed else [])
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.list_(pa.int32())) for c in columns]))
    # a slice and several chunks, as Ray Data hands batches over
    for batch in (table, table.slice(3, 5), pa.concat_tables([table.slice(0, 4), table.slice(6, 3)])):
        expected = collate(batch.to_pylist(), pad_token_id=3)
        got = collate_arrow(batch, pad_token_id=3)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


# --- reading files --------------------------------------------------------------------------

def test_reads_json_jsonl_and_parquet_alike(tmp_path):
    rows = [dict(GOOD, output=str(i)) for i in range(5)] + [{"instruction": "x", "output": "y"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist([dict(r, input=r.get("input", "")) for r in rows]), tmp_path / "d.parquet")
    # a .json file holding JSON lines is detected as JSONL
    write_jsonl(tmp_path / "lines.json", rows)
    results = [list(iter_records(tmp_path / name)) for name in ("d.json", "d.jsonl", "d.parquet", "lines.json")]
    assert all([r["output"] for r in result] == ["0", "1", "2", "3", "4", "y"] for result in results)
    assert all(result[-1]["input"] == "" for result in results)


def test_records_stream_rather_than_load_whole(tmp_path):
    # the file is broken after record 2: a reader that loads it whole fails before yielding anything
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join([json.dumps(GOOD)] * 2) + ', {"instruction": ')
    assert len(list(islice(iter_records(path), 2))) == 2
    with pytest.raises(DataError, match=r"big.json: record 3: the file is not valid JSON"):
        list(iter_records(path))


@pytest.mark.parametrize(
    "bad,reason",
    [
        ({"input": "", "output": "y"}, "missing field 'instruction'"),
        ({"instruction": "x", "input": ""}, "missing field 'output'"),
        ({"instruction": "x", "input": "", "output": 5}, "field 'output' must be a string, got int"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' must be a string, got list"),
        ({"instruction": "x", "input": "", "output": "   "}, "field 'output' is empty"),
        (b'{"instruction": "x", "input": "", "output": "caf\xe9"}', "invalid UTF-8"),
        (b'{"instruction": "x", "input": "", "output": ', "invalid JSON"),
        (b'["not", "an", "object"]', "expected an object"),
        # nesting past the interpreter's recursion limit, and past MAX_NESTING below it
        (b"[" * 100_000 + b"]" * 100_000, "objects and arrays nest deeper than 64 levels"),
        (dict(GOOD, extra=json.loads("[" * 65 + "]" * 65)), "objects and arrays nest deeper than 64 levels"),
    ],
)
def test_bad_jsonl_record_names_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        list(iter_records(path))
    assert f"{path}:3: {reason}" in str(err.value)
    assert "data.skip_bad_records=true" in str(err.value)
    report = ReadReport()
    kept = list(iter_records(path, skip_bad_records=True, report=report))
    assert len(kept) == 3 and report.bad_records == 1 and report.reasons[0].startswith(f"{path}:3:")


def test_bad_json_array_record_and_invalid_utf8(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"instruction": "x", "output": 1}, GOOD]))
    with pytest.raises(DataError, match=r"data.json: record 2: field 'output' must be a string"):
        list(iter_records(path))
    broken = tmp_path / "utf8.json"
    broken.write_bytes(b'[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "\xff", "output": "c"}]')
    with pytest.raises(DataError, match=r"utf8.json: record 2: the file is not valid JSON \(.*UTF8"):
        list(iter_records(broken))


def test_a_json_array_is_read_item_by_item_as_ijson_builds_items_and_deep_ones_are_bad_records(tmp_path):
    import ijson

    from raytune_it.data.records import _array_items

    document = b'[1, "x", null, {"a": [1, {"b": null, "c": 2.5}], "d": {}}, [], {}, [[[]]], {"k": "v"}]'
    assert list(_array_items(ijson.basic_parse(io.BytesIO(document), use_float=True))) == \
        list(ijson.items(io.BytesIO(document), "item", use_float=True))
    path = tmp_path / "deep.json"  # 64 levels in a record pass; 65 and 100,000 are bad records, read past
    path.write_text("[" + ",".join([json.dumps(dict(GOOD, extra=json.loads("[" * 63 + "]" * 63))),
                                    json.dumps(dict(GOOD, extra=json.loads("[" * 64 + "]" * 64))),
                                    "[" * 100_000 + "]" * 100_000, json.dumps(GOOD)]) + "]")
    with pytest.raises(DataError, match=r"deep.json: record 2: objects and arrays nest deeper than 64 levels"):
        list(iter_records(path))
    report = ReadReport()
    kept = list(iter_records(path, skip_bad_records=True, report=report))
    assert [len(r) for r in kept] == [4, 3] and report.bad_records == 2
    assert [reason.split(":")[1] for reason in report.reasons] == [" record 2", " record 3"]


def test_bad_parquet_record_and_corrupt_file(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, dict(GOOD, output=None)]), path)
    with pytest.raises(DataError, match=r"d.parquet: record 2: missing field 'output'"):
        list(iter_records(path))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_records(junk))


def test_stats_count_skipped_records_and_truncation(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 6 + [{"instruction": "x"}, b"{oops"]
                       + [{"instruction": "long", "input": "", "output": "w " * 300}])
    config = load_config("tiny-lora", [f"data.path={path}", "data.skip_bad_records=true", "train.max_seq_len=64"])
    stats = dataset_stats(config.data, tokenizer, 64, seed=0)
    assert stats.records == 7 and stats.bad_records_skipped == 2
    assert stats.truncated == 1 and stats.max_length == 64
    assert stats.train_records + stats.eval_records == 7
    assert len(stats.bad_record_reasons) == 2


# --- split and generated data ---------------------------------------------------------------

def test_split_is_deterministic_and_content_based():
    records = list(generate(2000, seed=0))
    splits = [split_of(r, 0.1, seed=42) for r in records]
    assert splits == [split_of(r, 0.1, seed=42) for r in reversed(records)][::-1]
    assert 120 < splits.count("eval") < 280
    assert splits != [split_of(r, 0.1, seed=43) for r in records]
    assert all(split_of(r, 0.0, seed=1) == "train" for r in records[:50])


def test_train_and_eval_examples_partition_the_data(tokenizer):
    config = load_config("tiny-lora", ["data.builtin_records=300", "data.eval_fraction=0.2"])
    train = list(iter_examples(config.data, tokenizer, 512, "train", 42))
    evals = list(iter_examples(config.data, tokenizer, 512, "eval", 42))
    assert len(train) + len(evals) == 300 and 30 < len(evals) < 90


def test_generator_is_deterministic_and_covers_families_and_domains():
    first, again, other = list(generate(300, seed=1)), list(generate(300, seed=1)), list(generate(300, seed=2))
    assert first == again and first != other
    assert {r["family"] for r in first} == {f.name for f in FAMILIES}
    assert {r["domain"] for r in first} == set(DOMAINS) == {"general", "medicine", "law", "finance"}
    dosage = [r for r in first if r["family"] == "dosage"][0]
    weight, dose = [int(t) for t in dosage["instruction"].split() if t.isdigit()]
    assert f"{weight * dose} mg" in dosage["output"]
    only = list(generate(20, seed=1, families=["bmi"]))
    assert {r["family"] for r in only} == {"bmi"}


def test_files_that_start_with_a_byte_order_mark_are_read(tmp_path):
    """Windows tools write UTF-8 with a BOM, JSON Lines and JSON alike."""
    rows = [GOOD, dict(GOOD, output="second")]
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode())
    lines_named_json = tmp_path / "bom-lines.json"
    lines_named_json.write_bytes(lines.read_bytes())
    for path in (lines, array, lines_named_json):
        assert [r["output"] for r in iter_records(path)] == [GOOD["output"], "second"], path.name


def test_a_json_object_where_an_array_is_needed_says_so(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(DataError, match=r"one.json: a .json file must be one array of records .* it is an object"):
        list(iter_records(path))


def test_a_file_whose_every_record_is_bad_stops_with_nothing_to_train_on(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}, {"output": "y"}])
    with pytest.raises(DataError, match=r"bad.jsonl: no usable record: all 2 were bad .*missing field"):
        list(iter_records(path, skip_bad_records=True))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        list(iter_records(empty))


def test_a_folder_as_data_path_reads_its_shards_in_name_order(tmp_path):
    """A folder (of JSON Lines, JSON or Parquet shards, one type) is one dataset, its shards read in name
    order; a bad record is named by its shard and line; an empty folder or one of mixed types is refused by
    name before anything runs."""
    from raytune_it.data.pipeline import resolve_data_paths

    folder = tmp_path / "shards"
    folder.mkdir()
    first, second = [dict(GOOD, instruction=f"Say {n}.") for n in range(3)], [dict(GOOD, instruction="Say 9.")]
    write_jsonl(folder / "part-1.jsonl", second)
    write_jsonl(folder / "part-0.jsonl", first)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-2.jsonl.crc").write_text("x")
    config = load_config("tiny-lora", [f"data.path={folder}"])
    files = resolve_data_paths(config.data)
    assert [f.name for f in files] == ["part-0.jsonl", "part-1.jsonl"]
    assert [r["instruction"] for r in iter_records(files)] == ["Say 0.", "Say 1.", "Say 2.", "Say 9."]
    assert [r["instruction"] for r in iter_records(files, limit=2)] == ["Say 0.", "Say 1."]
    (folder / "part-1.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match=rf"{folder / 'part-1.jsonl'}:1: missing field"):
        list(iter_records(files))
    (folder / "part-3.parquet").write_text("")
    with pytest.raises(ConfigError, match=r"data.path: the folder .*shards mixes file types \(jsonl, parquet\)"):
        load_config("tiny-lora", [f"data.path={folder}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data.path: the folder .*empty holds no .json, .jsonl"):
        load_config("tiny-lora", [f"data.path={empty}"])


def test_tokenizing_pauses_the_garbage_collector_for_its_batch_only(tokenizer):
    """The collector is off while a batch is tokenized (its full passes were a sixth of preparation time)
    and back as it was after, on or off, also when tokenizing fails."""
    import gc

    seen = []

    class Watched:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, *args, **kwargs):
            seen.append(gc.isenabled())
            return self._inner(*args, **kwargs)

    assert gc.isenabled()
    assert tokenize_records([GOOD], Watched(tokenizer), 64) and seen == [False] and gc.isenabled()
    gc.disable()
    try:
        tokenize_records([GOOD], Watched(tokenizer), 64)
        assert not gc.isenabled(), "a caller's choice to keep it off is kept"
    finally:
        gc.enable()
    with pytest.raises(KeyError):
        tokenize_records([{"instruction": "x"}], Watched(tokenizer), 64)  # no output: fails while paused
    assert gc.isenabled()
