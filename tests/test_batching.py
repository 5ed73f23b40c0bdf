"""Batches: layout, padding, masks, length bucketing and resumable order."""

from itertools import islice

import numpy as np

from orpo_local.batching import bucket, collate, iterate_batches
from orpo_local.tokenization import TokenizedPair


def pairs(n=10):
    rng = np.random.default_rng(0)
    return [TokenizedPair([1] * int(rng.integers(1, 30)), [2] * int(rng.integers(1, 40)), [3] * int(rng.integers(1, 40)), row=i)
            for i in range(n)]


def test_collate_layout_and_masks():
    ps = [TokenizedPair([5, 6], [7, 8, 9], [10]), TokenizedPair([5], [11], [12, 13])]
    b = collate(ps, pad_id=0, pad_to=32)
    assert b["input_ids"].shape == (4, 32) and b["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["input_ids"][:, :5], [[5, 6, 7, 8, 9], [5, 11, 0, 0, 0], [5, 6, 10, 0, 0], [5, 12, 13, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [5, 2, 3, 3])
    np.testing.assert_array_equal(b["response_mask"][:, :5], [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]])
    assert collate(ps, pad_id=0, pad_to=1)["input_ids"].shape == (4, 5)


def test_buckets_group_similar_lengths_and_cover_every_pair():
    ps = pairs(25)
    batches = bucket(ps, 4)
    assert sorted(i for b in batches for i in b) == list(range(25))
    lengths = [[ps[i].length for i in b] for b in batches]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))


def test_each_epoch_visits_every_batch_once_in_a_seeded_order_and_resume_is_exact():
    ps = pairs(10)
    run = [(k, b["input_ids"].tolist()) for k, b in islice(iterate_batches(ps, 4, 0, seed=1), 9)]
    epoch0 = sorted(map(str, (b for _, b in run[:3])))
    epoch1 = sorted(map(str, (b for _, b in run[3:6])))
    assert epoch0 == epoch1  # same batches, each once per epoch
    orders = [[b for _, b in run[i:i + 3]] for i in (0, 3, 6)]
    assert len({str(o) for o in orders}) > 1  # the order changes between epochs
    assert [k for k, _ in run] == list(range(9))
    resumed = [(k, b["input_ids"].tolist()) for k, b in islice(iterate_batches(ps, 4, 0, seed=1, start=5), 4)]
    assert resumed == run[5:9]
    other = [b["input_ids"].tolist() for _, b in islice(iterate_batches(ps, 4, 0, seed=2), 3)]
    assert sorted(map(str, other)) == epoch0
    once = list(iterate_batches(ps, 4, 0, seed=1, loop=False))
    assert len(once) == 3
