"""The bulk restore of changelog partitions, against an in-memory log and store."""

from __future__ import annotations

import asyncio

from coupon_stream.connectors.restore import Progress, catch_up
from coupon_stream.connectors.store import MemoryStore
from coupon_stream.foundation import metrics
from tests.unit.fakes import Changelog, log_of
from tests.unit.samples import sample

TOPIC = "app-buyers-changelog"


def restored(store: MemoryStore, partition: int) -> dict[bytes, bytes]:
    return dict(store.items(partition))


async def run(log: Changelog, store: MemoryStore, partitions=(0,), progress=None):
    progress = progress or Progress()
    parts = await catch_up(log, store, "entries", TOPIC, partitions, progress)
    return {p: part.reached - part.start for p, part in parts.items()}, progress


async def test_applies_the_log_past_the_persisted_offset_in_order():
    log = Changelog(
        {0: log_of((b"1", b"a"), (b"2", b"b"), (b"1", b"c"), (b"3", b"d"), (b"2", None))}
    )
    store = MemoryStore()
    store.write(0, {b"1": b"a"})
    store.persist_offset(0, 0)
    read, progress = await run(log, store)
    assert read == {0: 4} and progress.applied == 4
    assert log.asked == {0: (1, 5)}
    assert restored(store, 0) == {b"1": b"c", b"3": b"d"}  # later values win, None deletes
    assert store.persisted_offset(0) == 4  # Faust's convention: the last record applied


async def test_starts_where_the_log_starts_when_its_head_was_compacted_away():
    log = Changelog({0: log_of(*[(b"k%d" % i, b"v%d" % i) for i in range(6)])}, first={0: 4})
    store = MemoryStore()
    _, progress = await run(log, store)
    assert progress.applied == 2
    assert restored(store, 0) == {b"k4": b"v4", b"k5": b"v5"}
    assert store.persisted_offset(0) == 5


async def test_a_copy_that_is_current_reads_nothing():
    log = Changelog({0: log_of((b"1", b"a"), (b"2", b"b")), 1: []})
    store = MemoryStore()
    store.persist_offset(0, 1)
    read, _ = await run(log, store, partitions=(0, 1))
    assert read == {0: 0, 1: 0} and log.asked == {}


async def test_a_cancelled_restore_keeps_a_prefix_with_its_offset_and_the_next_goes_on():
    log = Changelog({0: log_of(*[(b"k%d" % i, b"v%d" % i) for i in range(10)])})
    log.hold_after = 1  # one batch of 3, then a rebalance cancels it
    store = MemoryStore()
    task = asyncio.ensure_future(run(log, store))
    while store.persisted_offset(0) is None:
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert restored(store, 0) == {b"k0": b"v0", b"k1": b"v1", b"k2": b"v2"}
    assert store.persisted_offset(0) == 2
    log.hold_after = None
    read, _ = await run(log, store)
    assert read == {0: 7} and log.asked == {0: (3, 10)}
    assert len(restored(store, 0)) == 10


async def test_progress_tells_what_is_left_per_partition():
    log = Changelog({0: log_of(*[(b"a", b"1")] * 6), 1: log_of(*[(b"b", b"2")] * 4)})
    log.hold_after = 2
    progress = Progress()
    task = asyncio.ensure_future(run(log, MemoryStore(), partitions=(0, 1), progress=progress))
    while progress.applied < 6:
        await asyncio.sleep(0)
    left = sample("coupon_state_restore_remaining_records", table="entries", partition="1")
    assert left == 4
    (restoring,) = progress.restoring()
    assert restoring["table"] == "entries" and restoring["partition"] == 1
    assert restoring["records_left"] == 4 and restoring["eta_seconds"] is not None
    log.release.set()
    await task
    assert progress.restoring() == [] and progress.left() == 0
    progress.clear()  # the next assignment's restore starts with no stale gauges
    (family,) = metrics.STATE_RESTORE_REMAINING.collect()
    gauges = family.samples
    assert not [g for g in gauges if g.labels == {"table": "entries", "partition": "1"}]
