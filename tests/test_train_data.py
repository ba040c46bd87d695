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
