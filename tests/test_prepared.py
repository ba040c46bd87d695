"""Prepared datasets: one key for what decides the rows, tokenized once into storage, shared and resumed.

No Ray here: preparing is the driver's work. The sweep that tokenizes once is in test_sweep.py."""

import json
import os

import pyarrow.parquet as pq
import pytest

from raytune_it.config import load_config
from raytune_it.data.synthetic import generate, write_jsonl
from raytune_it.errors import ConfigError
from raytune_it.storage import local
from raytune_it.train.prepared import (
    PREPARED_DIR,
    RUN_RECORD,
    STATS_FILE,
    PreparedData,
    _write,
    dataset_inputs,
    dataset_key,
    prepare,
    prepare_for_run,
    recorded_dataset,
)


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    write_jsonl(generate(60, seed=3), path)
    return path


def _config(tmp_path, records, *overrides):
    return load_config("tiny-lora", [f"run.storage={tmp_path / 'runs'}", f"data.path={records}", *overrides])


def _key(config, tokenizer):
    return dataset_key(dataset_inputs(config, tokenizer))


def test_the_key_follows_what_decides_the_rows_and_nothing_else(tmp_path, records, tokenizer):
    base = _key(_config(tmp_path, records), tokenizer)
    for same in (["lora.rank=4"], ["method=full"], ["train.micro_batch_size=2"], ["train.learning_rate=1e-3"],
                 ["run.name=another"], ["train.max_steps=3"], ["data.group_by_length=true"], ["scaling.num_workers=1"]):
        assert _key(_config(tmp_path, records, *same), tokenizer) == base, same
    changed = {_key(_config(tmp_path, records, *other), tokenizer) for other in (
        ["train.max_seq_len=128"], ["data.packing=true"], ["data.template=chatml"], ["data.eval_fraction=0.2"],
        ["train.seed=7"], ["data.max_records=10"], ["data.skip_bad_records=true"])}
    assert base not in changed and len(changed) == 7
    os.utime(records, ns=(1, 1))  # the file rewritten (its time changed): its rows may have too
    assert _key(_config(tmp_path, records), tokenizer) != base
    for same in (["data.streaming=always"], ["data.shuffle_window_row_groups=2"]):  # how it is read, not its rows
        assert _key(_config(tmp_path, records, *same), tokenizer) == _key(_config(tmp_path, records), tokenizer)


def test_a_folder_of_shards_is_one_dataset_whose_key_follows_every_shard(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(generate(30, seed=3), folder / "part-0.jsonl")
    write_jsonl(generate(30, seed=4), folder / "part-1.jsonl")
    config = _config(tmp_path, folder)
    prepared, _ = prepare(config, tokenizer)
    assert prepared.records == 60 and prepared.train_rows + prepared.eval_rows == 60
    base = _key(config, tokenizer)
    write_jsonl(generate(5, seed=5), folder / "part-2.jsonl")  # a shard added: other data
    assert _key(config, tokenizer) != base


def test_a_rerun_under_a_new_name_tokenizes_nothing_and_each_run_names_its_dataset(tmp_path, records, tokenizer):
    first = _config(tmp_path, records)
    prepared, reused = prepare_for_run(first, tokenizer, local(tmp_path / "runs" / "first"))
    root = tmp_path / "runs" / PREPARED_DIR
    files = sorted(p.name for p in (root / prepared.key).iterdir())
    assert not reused and len(files) == 3 and STATS_FILE in files
    stats = json.loads((root / prepared.key / STATS_FILE).read_text())
    assert stats["records"] == 60 and stats["train_rows"] + stats["eval_rows"] == 60
    assert stats["train_rows"] == pq.read_table(prepared.files("train")[0].path).num_rows

    again, reused = prepare_for_run(_config(tmp_path, records, "run.name=second", "lora.rank=4"), tokenizer,
                                    local(tmp_path / "runs" / "second"))
    assert reused and again == prepared and sorted(p.name for p in (root / prepared.key).iterdir()) == files
    for run in ("first", "second"):
        assert json.loads((tmp_path / "runs" / run / RUN_RECORD).read_text())["key"] == prepared.key
    assert list(tmp_path.rglob(STATS_FILE)) == [root / prepared.key / STATS_FILE]


def test_two_runs_preparing_one_key_at_once_keep_one_whole_copy(tmp_path, records, tokenizer):
    """No lock (an object store has none): each writer names its own files; the later drops them."""
    config = _config(tmp_path, records)
    inputs = dataset_inputs(config, tokenizer)
    folder = local(tmp_path / "runs" / PREPARED_DIR / dataset_key(inputs))
    first = _write(config, tokenizer, folder, dataset_key(inputs), inputs, None)
    second = _write(config, tokenizer, folder, dataset_key(inputs), inputs, None)
    assert second.train_files == first.train_files
    assert sorted(os.listdir(folder.path)) == sorted([STATS_FILE, *first.train_files, *first.eval_files])


def test_a_resume_trains_on_its_recorded_data_and_refuses_changed_data(tmp_path, records, tokenizer):
    config = _config(tmp_path, records)
    run_dir = local(tmp_path / "runs" / "tiny-lora")
    prepared, _ = prepare_for_run(config, tokenizer, run_dir)
    assert recorded_dataset(config, run_dir) == prepared

    (tmp_path / "runs" / PREPARED_DIR / prepared.key / STATS_FILE).unlink()  # the shared copy deleted
    again, reused = prepare_for_run(config, tokenizer, run_dir)
    assert not reused and again.key == prepared.key and again.train_rows == prepared.train_rows

    (tmp_path / "runs" / PREPARED_DIR / prepared.key / STATS_FILE).unlink()
    write_jsonl(generate(70, seed=4), records)  # ... and the data changed under the run
    with pytest.raises(ConfigError, match=rf"started on prepared dataset {prepared.key}.*new run.name"):
        prepare_for_run(config, tokenizer, run_dir)


def test_a_run_begun_before_sharing_keeps_its_own_data_folder(tmp_path, records, tokenizer):
    config = _config(tmp_path, records)
    legacy = tmp_path / "runs" / "tiny-lora" / "data"
    legacy.mkdir(parents=True)
    (legacy / STATS_FILE).write_text(json.dumps({"train_rows": 5, "eval_rows": 0, "train_tokens": 50,
                                                 "bad_records_skipped": 0, "truncated": 0, "folder": "old"}))
    prepared, reused = prepare_for_run(config, tokenizer, local(tmp_path / "runs" / "tiny-lora"))
    assert reused and prepared.train_rows == 5 and prepared.files("train")[0].path == str(legacy / "train.parquet")
    assert not (tmp_path / "runs" / PREPARED_DIR).exists()


def test_statistics_count_bad_records_of_both_files_and_packing(tmp_path, records, tokenizer):
    evaluation = tmp_path / "eval.jsonl"
    write_jsonl(generate(10, seed=5), evaluation)
    with evaluation.open("a") as handle:
        handle.write("{not json\n")
    with records.open("a") as handle:
        handle.write('{"instruction": "no output"}\n')
    config = _config(tmp_path, records, f"data.eval_path={evaluation}", "data.skip_bad_records=true",
                     "data.packing=true")
    prepared, _ = prepare(config, tokenizer)
    assert (prepared.records, prepared.bad_records_skipped, prepared.eval_rows > 0) == (70, 2, True)
    lengths = [len(row) for row in pq.read_table(prepared.files("train")[0].path).column("input_ids").to_pylist()]
    assert prepared.train_tokens == sum(lengths)
    assert prepared.packing_efficiency == round(sum(lengths) / (len(lengths) * config.train.max_seq_len), 4)
    assert PreparedData.load(prepared.folder) == prepared


def test_data_prepare_prints_the_key_and_reuses_it(tmp_path, records, capsys):
    from raytune_it.cli import main

    command = ["data", "prepare", "--json", "tiny-lora", f"run.storage={tmp_path / 'runs'}", f"data.path={records}"]
    assert main(command) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(command + ["lora.rank=4"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["reused"], second["reused"], second["key"]) == (False, True, first["key"])
    assert first["folder"] == str(tmp_path / "runs" / PREPARED_DIR / first["key"]) and first["records"] == 60
