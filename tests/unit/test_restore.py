"""Bulk catch-up from the changelog, against an in-memory log and store."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from coupon_stream.connectors.restore import catch_up
from coupon_stream.connectors.store import MemoryStore

TOPIC = "app-buyers-changelog"


class Record(NamedTuple):
    offset: int
    key: bytes
    value: bytes | None


class Changelog:
    """Partitions as lists of records; `first` is where compaction or retention left the log."""

    def __init__(self, logs: dict[int, list[Record]], first: dict[int, int] | None = None):
        self.logs = logs
        self.first = first or {}
        self.fetch = 3  # records per fetched batch
        self.asked: dict[int, tuple[int, int]] = {}

    async def end_offsets(self, topic, partitions):
        return {p: len(self.logs[p]) for p in partitions}

    async def batches(self, topic, ranges):
        self.asked = dict(ranges)
        for partition, (start, end) in ranges.items():
            offset = max(start, self.first.get(partition, 0))
            while offset < end:
                records = self.logs[partition][offset : min(offset + self.fetch, end)]
                offset += len(records)
                yield partition, records, offset


def log_of(*pairs: tuple[bytes, bytes | None]) -> list[Record]:
    return [Record(i, k, v) for i, (k, v) in enumerate(pairs)]


def restored(store: MemoryStore, partition: int) -> dict[bytes, bytes]:
    return dict(store.items(partition))


async def run(log: Changelog, store: MemoryStore, partitions=(0,), **kwargs):
    kwargs.setdefault("budget", 60.0)
    kwargs.setdefault("still_current", lambda: True)
    kwargs.setdefault("min_records", 1)
    return await catch_up(log, store, TOPIC, partitions, **kwargs)


async def test_applies_the_log_past_the_persisted_offset_in_order():
    log = Changelog(
        {0: log_of((b"1", b"a"), (b"2", b"b"), (b"1", b"c"), (b"3", b"d"), (b"2", None))}
    )
    store = MemoryStore()
    store.write(0, {b"1": b"a"})
    store.persist_offset(0, 0)
    assert await run(log, store) == {0: 4}
    assert log.asked == {0: (1, 5)}
    assert restored(store, 0) == {b"1": b"c", b"3": b"d"}  # later values win, None deletes
    assert store.persisted_offset(0) == 4


async def test_starts_where_the_log_starts_when_its_head_was_compacted_away():
    log = Changelog({0: log_of(*[(b"k%d" % i, b"v%d" % i) for i in range(6)])}, first={0: 4})
    store = MemoryStore()
    assert await run(log, store) == {0: 2}
    assert restored(store, 0) == {b"k4": b"v4", b"k5": b"v5"}
    assert store.persisted_offset(0) == 5


async def test_leaves_short_tails_to_faust():
    log = Changelog({0: log_of((b"1", b"a"), (b"2", b"b")), 1: log_of(*[(b"x", b"y")] * 5)})
    store = MemoryStore()
    assert await run(log, store, partitions=(0, 1), min_records=3) == {1: 5}
    assert restored(store, 0) == {}
    assert store.persisted_offset(0) is None


@pytest.mark.parametrize("stop", ["budget", "rebalanced"])
async def test_stopping_early_keeps_a_prefix_with_its_offset(stop):
    log = Changelog({0: log_of(*[(b"k%d" % i, b"v%d" % i) for i in range(10)])})
    store = MemoryStore()
    if stop == "budget":
        applied = await run(log, store, budget=-1)
    else:
        applied = await run(log, store, still_current=lambda: False)
    assert applied == {0: 3}  # one fetched batch
    assert restored(store, 0) == {b"k0": b"v0", b"k1": b"v1", b"k2": b"v2"}
    assert store.persisted_offset(0) == 2  # Faust's recovery goes on from offset 3


async def test_an_empty_changelog_at_start_up_costs_no_request():
    class Unreachable(Changelog):
        async def end_offsets(self, topic, partitions):
            raise AssertionError("asked Kafka")

    log = Unreachable({0: []})
    assert await run(log, MemoryStore(), ends_hint={0: 0}, min_records=1) == {}
    log = Changelog({0: log_of((b"1", b"a"), (b"2", b"b"))})  # grew since the hint
    assert await run(log, MemoryStore(), ends_hint={0: 1}, min_records=1) == {0: 2}
