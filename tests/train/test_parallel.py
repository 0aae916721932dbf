"""What a multi-process run does itself: round-robin shards of the data order, forwards in lockstep, merged
metric windows. (The runs under each engine: tests/train/test_engine.py.)"""

from __future__ import annotations

from dpo.train.parallel import lockstep, merge_sums, shard

# ------------------------------------------------------------------------------------------ shards


def test_shard_takes_every_world_th_item_from_its_rank():
    items = list(range(10))
    assert shard(items, 0, 3, whole_rounds=False) == [0, 3, 6, 9]
    assert shard(items, 1, 3, whole_rounds=False) == [1, 4, 7]
    assert shard(items, 2, 3, whole_rounds=False) == [2, 5, 8]


def test_shards_cover_every_item_once_for_evaluation():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shards = [shard(list(range(n)), r, world, whole_rounds=False) for r in range(world)]
            assert sorted(x for s in shards for x in s) == list(range(n))


def test_training_shards_are_whole_rounds_of_equal_length():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shards = [shard(list(range(n)), r, world, whole_rounds=True) for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            assert len(shards[0]) == n // world
            taken = sorted(x for s in shards for x in s)
            assert taken == list(range(n // world * world))  # only the last incomplete round is left out


def test_one_process_keeps_everything():
    assert shard([4, 5, 6], 0, 1, whole_rounds=True) == [4, 5, 6]


def test_merge_sums_adds_sums_and_counts_key_by_key():
    sums, counts = merge_sums([({"loss": 1.5, "acc": 2.0}, {"loss": 3, "acc": 4}),
                               ({"loss": 0.5}, {"loss": 1}),
                               ({}, {})])
    assert sums == {"loss": 2.0, "acc": 2.0}
    assert counts == {"loss": 4, "acc": 4}


def test_lockstep_gives_every_process_as_many_forwards_and_counts_each_item_once():
    for n in range(1, 12):
        for world in (1, 2, 3, 5):
            parts = [lockstep(list(range(n)), r, world) for r in range(world)]
            assert {len(part) for part in parts} == {-(-n // world)}
            counted = sorted(item for part in parts for item, counts in part if counts)
            assert counted == list(range(n))
            assert all(item == 0 for part in parts for item, counts in part if not counts)  # repeats of the first


def test_lockstep_of_nothing_is_nothing():
    assert lockstep([], 0, 2) == []
