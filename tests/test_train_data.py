"""How the workers read the training split: a seeded order over the whole split per epoch, dealt to the
workers, cut into (optionally length-grouped) micro-batches, resumable by index."""

import random

import numpy as np
import pyarrow as pa

from raytune_it.train.data import epoch_rows, eval_rows, micro_batch_rows, micro_batches, row_lengths

PAD = 3


def test_each_epoch_mixes_the_whole_split_in_its_own_order():
    """A split made of two sorted halves (two sources concatenated) shows both halves in the first 10% of
    every epoch, and two epochs have different orders; the same seed gives the same orders again."""
    rows = 10_000
    for world_size in (1, 2):
        for epoch in (0, 1):
            for rank in range(world_size):
                first = epoch_rows(rows, seed=7, epoch=epoch, rank=rank,
                                   world_size=world_size)[:rows // 10 // world_size]
                from_first_half = int((first < rows // 2).sum())
                assert 0.4 < from_first_half / len(first) < 0.6, (world_size, epoch, rank, from_first_half)
    zero, one = epoch_rows(rows, 7, 0, 0, 1), epoch_rows(rows, 7, 1, 0, 1)
    assert not np.array_equal(zero, one) and sorted(zero) == sorted(one) == list(range(rows))
    assert np.array_equal(zero, epoch_rows(rows, 7, 0, 0, 1)), "reproducible for a resumed run"


def test_workers_get_disjoint_equal_shares_for_training_and_eval():
    shares = [epoch_rows(1001, 7, 0, rank, 4) for rank in range(4)]
    assert {len(share) for share in shares} == {250}, "every worker runs the same number of steps"
    assert len(set(np.concatenate(shares))) == 1000
    # Eval too: equal shares, so every ZeRO-3 rank runs the same number of eval forwards.
    eval_shares = [eval_rows(1001, rank, 4) for rank in range(4)]
    assert {len(share) for share in eval_shares} == {250}
    assert len(set(np.concatenate(eval_shares))) == 1000


def _table(lengths):
    return pa.table({"input_ids": [[PAD + 1 + i % 50] * n for i, n in enumerate(lengths)],
                     "labels": [[PAD + 1 + i % 50] * n for i, n in enumerate(lengths)]})


def test_length_grouped_micro_batches_pad_less_keep_every_row_and_repeat_exactly():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    table = _table(lengths)
    order = epoch_rows(1000, 3, 0, 0, 1)

    def cut(group):
        return micro_batch_rows(order, row_lengths(table), 8, drop_last=True, group_by_length=group, seed=3)

    plain, grouped = cut(False), cut(True)
    assert len(grouped) == len(plain) == 1000 // 8 and all(len(rows) == 8 for rows in grouped)
    assert sorted(i for rows in grouped for i in rows) == sorted(int(i) for i in order)
    assert grouped == cut(True), "the same micro-batches for the same seed and epoch"

    def real_and_padded(rows):
        batches = list(micro_batches(table, rows, PAD))
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        return real, sum(b["input_ids"].numel() for b in batches)

    (plain_real, plain_padded), (grouped_real, grouped_padded) = real_and_padded(plain), real_and_padded(grouped)
    assert grouped_real == plain_real == sum(lengths)
    assert grouped_real / grouped_padded > plain_real / plain_padded + 0.1
    widths = [max(lengths[i] for i in rows) for rows in grouped]
    assert widths != sorted(widths), "long and short micro-batches stay mixed across the epoch"


def test_micro_batches_are_the_rows_asked_for():
    table = _table([3, 5, 2, 7])
    [batch] = list(micro_batches(table, [[3, 1]], PAD))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [7, 5]
    assert batch["input_ids"][0, :7].tolist() == [PAD + 4] * 7


# --- a split streamed from storage (train/streaming.py) ------------------------------------------------

def _split_files(folder, lengths, group_rows, files=2):
    """The split ``_table(lengths)`` written as ``files`` Parquet files in row groups of ``group_rows``."""
    import pyarrow.parquet as pq

    from raytune_it.storage import local

    table, paths, per_file = _table(lengths), [], -(-len(lengths) // files)
    for number in range(files):
        path = folder / f"part-{number}.parquet"
        pq.write_table(table.slice(number * per_file, per_file), path, row_group_size=group_rows)
        paths.append(local(path))
    return table, paths


def test_a_streamed_epoch_permutes_row_groups_and_shuffles_rows_within_windows():
    """Row groups of 100 rows, windows of 4: every worker's share is still an equal, disjoint part of a
    seeded permutation of every row; the rows of the first window come from 4 row groups only; epochs
    differ; and a split of no more row groups than a window is the whole-split permutation, row for row."""
    groups = [100] * 30 + [37]
    rows = sum(groups)
    shares = [epoch_rows(rows, 7, 0, rank, 2, groups, 4) for rank in range(2)]
    assert {len(share) for share in shares} == {rows // 2}
    assert len(set(np.concatenate(shares))) == 2 * (rows // 2) and max(np.concatenate(shares)) < rows
    first_window = np.concatenate([share[:150] for share in shares])
    assert len({int(index) // 100 for index in first_window}) <= 4, "one window: at most 4 row groups"
    assert not np.array_equal(shares[0], epoch_rows(rows, 7, 1, 0, 2, groups, 4)), "each epoch its own order"
    assert np.array_equal(shares[0], epoch_rows(rows, 7, 0, 0, 2, groups, 4)), "reproducible for a resume"
    assert np.array_equal(epoch_rows(rows, 7, 0, 1, 2, groups, 31), epoch_rows(rows, 7, 0, 1, 2))


def test_a_streamed_split_reads_the_rows_asked_for_and_holds_two_windows_at_most(tmp_path):
    from raytune_it.train.streaming import split_bytes, streamed_split

    rng = random.Random(1)
    lengths = [rng.randint(1, 40) for _ in range(2_000)]
    table, files = _split_files(tmp_path, lengths, group_rows=128)
    split = streamed_split(files, window=3)
    assert split.rows == 2_000 and len(split.groups) == 16 and split_bytes(files) > 0
    reader = split.reader()
    assert reader.lengths.tolist() == lengths
    order = epoch_rows(2_000, 5, 0, 0, 1, reader.group_rows, 3)
    for rows in micro_batch_rows(order, reader.lengths, 8, drop_last=True, group_by_length=True, seed=5):
        assert reader.take(rows).to_pylist() == table.take(rows).to_pylist()
        assert len(reader.cache) <= 6
    assert reader.reads == 16, "each row group is read once an epoch"
    across = [0, 1999, 500, 128, 127]  # any rows, in the order asked
    assert reader.take(across).to_pylist() == table.take(across).to_pylist()


def test_a_split_streams_when_it_outgrows_its_share_of_the_object_store():
    from raytune_it.config import load_config
    from raytune_it.train.prepared import streams

    auto = load_config("tiny-lora", ["data.object_store_share=0.25"]).data
    assert not streams(auto, 2 * 2**30, 8 * 2**30) and streams(auto, 2 * 2**30 + 1, 8 * 2**30)
    assert streams(load_config("tiny-lora", ["data.streaming=always"]).data, 1, 8 * 2**30)
    assert not streams(load_config("tiny-lora", ["data.streaming=never"]).data, 10 * 2**30, 8 * 2**30)
