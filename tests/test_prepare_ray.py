"""Preparation on Ray Data: chunks on actors give the driver path's rows, in its order, and keep its bad-record
rules. The files are cut into many small chunks, so every rule is crossed by chunk ends."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_it.config import load_config
from raytune_it.data.synthetic import generate, write_jsonl
from raytune_it.errors import ConfigError, DataError
from raytune_it.storage import local
from raytune_it.train.prepare_ray import prepare_on_ray_data, use_ray_data
from raytune_it.train.prepared import write_split

pytestmark = pytest.mark.integration
SMALL = {"chunk_bytes": 4096, "chunk_rows": 40}


def _config(tmp_path, path, *overrides):
    return load_config("tiny-lora", [f"run.storage={tmp_path}", f"data.path={path}", "data.eval_fraction=0.2",
                                     "data.preparation_actors=2", *overrides])


def _rows(files):
    return [row for file in files for row in pq.read_table(file.path).to_pylist()]


def _both(config, tokenizer, tmp_path, name):
    """The driver path's rows and counts, and Ray Data's, for one config."""
    driver = {split: write_split(config, tokenizer, split, local(tmp_path / f"{name}-{split}.parquet"))
              for split in ("train", "eval")}
    folder = local(tmp_path / f"{name}-ray")
    files, ray = prepare_on_ray_data(config, tokenizer, folder, "t0", chunk_sizes=SMALL)
    for split in ("train", "eval"):
        rows, stats, report = driver[split]
        assert _rows([local(tmp_path / f"{name}-{split}.parquet")]) == _rows([folder / f for f in files[split]])
        assert (rows, stats, report) == ray[split], split
    return driver, files


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    write_jsonl(generate(300, seed=2), path)
    return path


def test_ray_data_gives_the_driver_paths_rows_in_order_split_and_packed(local_ray, tmp_path, records, tokenizer):
    driver, files = _both(_config(tmp_path, records), tokenizer, tmp_path, "plain")
    assert len(files["train"]) > 5 and driver["eval"][0] > 0, "many chunks, and both splits hold rows"
    driver, files = _both(_config(tmp_path, records, "data.packing=true", "train.max_seq_len=256"), tokenizer,
                          tmp_path, "packed")
    assert files["train"] == ["train-t0.parquet"] and driver["train"][0] < 300 * 0.8 / 2


def test_bad_records_are_counted_across_chunks_or_the_first_stops_it_by_its_line(local_ray, tmp_path, tokenizer):
    """The data is a folder of two JSON Lines shards (read in name order, as one dataset), with bad records
    in three chunks of both: each is named by its own shard and line, on both paths."""
    lines = [json.dumps(record) for record in generate(200, seed=5)]
    for number in (7, 90, 160):  # in three chunks
        lines[number] = '{"instruction": "no output"' if number != 90 else "{not json"
    path = tmp_path / "shards"
    path.mkdir()
    first, second = path / "part-00000.jsonl", path / "part-00001.jsonl"
    second.write_text("\n".join(lines[100:]) + "\n\n")
    first.write_text("\n".join(lines[:100]) + "\n")
    (path / "_SUCCESS").write_text("")  # what Spark and Ray Data leave beside their shards: not data
    driver, _ = _both(_config(tmp_path, path, "data.skip_bad_records=true"), tokenizer, tmp_path, "skip")
    report = driver["train"][2]
    assert report.bad_records == 3 and [reason.split(": ")[0] for reason in report.reasons] == [
        f"{first}:8", f"{first}:91", f"{second}:61"]
    assert report.records + report.bad_records == 200

    folder = local(tmp_path / "stop")
    with pytest.raises(DataError, match=rf"^{first}:8: invalid JSON"):
        write_split(_config(tmp_path, path), tokenizer, "train", local(tmp_path / "stop-driver.parquet"))
    with pytest.raises(DataError, match=rf"^{first}:8: ") as caught:
        prepare_on_ray_data(_config(tmp_path, path), tokenizer, folder, "t1", chunk_sizes=SMALL)
    assert "data.skip_bad_records=true" in str(caught.value)
    assert not folder.exists() or folder.listdir() == [], "a failed preparation leaves no shard"


def test_parquet_row_groups_and_an_eval_file_give_the_driver_paths_rows(local_ray, tmp_path, records, tokenizer):
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(list(generate(150, seed=8))), train, row_group_size=25)
    config = _config(tmp_path, train, f"data.eval_path={records}")
    driver, files = _both(config, tokenizer, tmp_path, "parquet")
    assert len(files["train"]) == 3 and driver["eval"][0] == driver["eval"][2].records == 300


def test_the_choice_of_path_is_refused_before_reading_where_it_cannot_hold(tmp_path, records):
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(list(generate(5, seed=1))))
    with pytest.raises(ConfigError, match=r"data.preparation=ray_data: the data is a JSON array.*data.preparation="
                                          r"driver \(allowed: auto, driver, ray_data\)"):
        use_ray_data(_config(tmp_path, array, "data.preparation=ray_data"))
    with pytest.raises(ConfigError, match="data.max_records is set"):
        use_ray_data(_config(tmp_path, records, "data.preparation=ray_data", "data.max_records=10"))
    assert not use_ray_data(_config(tmp_path, records)), "auto: a small file is tokenized on the driver"
    assert use_ray_data(_config(tmp_path, records, "data.preparation=ray_data"))
    assert not use_ray_data(_config(tmp_path, array))


def test_the_chunks_are_even_and_a_multiple_of_the_actors(tmp_path, records, monkeypatch):
    """The pool ends together: as many chunks as a multiple of the actors, at least CHUNKS_PER_ACTOR each,
    of one size (each ends at a line end, so they differ by less than a line), none a short remainder; also
    where the data is more than CHUNKS_PER_ACTOR chunks of the largest size per actor."""
    from raytune_it.data import chunks as chunking
    from raytune_it.train import prepare_ray

    monkeypatch.setattr(prepare_ray, "MIN_CHUNK_BYTES", 1)  # the 300-record file is far below the real floors
    config = _config(tmp_path, records)
    data = records.read_bytes()
    longest_line = max(len(line) for line in data.splitlines(keepends=True))
    for largest, actors, expected in ((len(data), 2, 8), (len(data), 3, 12), (len(data) // 9, 2, 10)):
        monkeypatch.setattr(chunking, "CHUNK_BYTES", largest)
        chunks = prepare_ray.plan(config, actors)
        assert len(chunks) == expected, (largest, actors)
        sizes = [chunk.end - chunk.start for chunk in chunks]
        assert max(sizes) - min(sizes) < len(chunks) * longest_line, sizes
