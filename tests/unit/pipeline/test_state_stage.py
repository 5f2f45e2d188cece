"""The state stage inside the app: dead letters, read-backs of undelivered messages, and
where a session starts (fixtures in conftest.py)."""

from __future__ import annotations

from coupon_stream.connectors.store import MemoryStore
from coupon_stream.core.stored import NEXT_OFFSET_KEY, encode_value
from coupon_stream.pipeline import state_stage
from tests.unit.conftest import batch, group, row, stored


async def test_a_future_date_under_retention_is_dead_lettered_not_a_watermark(
    make_stream, tmp_path
):
    cs = make_stream(tmp_path, partitions=1, state_retention_days=30)
    received = 1_794_096_000_000  # 2026-11-08
    await cs.stage.add(batch(row("o1", 5, "x", day=20261107)), 0, 0, "t0", 0, received)
    await cs.stage.add(batch(row("bot", 5, "x", day=99991231)), 0, 1, "t1", 0, received)
    await cs.stage.add(batch(row("o2", 7, "x", day=20261108)), 0, 2, "t2", 0, received)
    await cs.checkpoint()
    assert cs.sink.table[(5, 20261107)].cumulate_amount == 5
    assert cs.sink.table[(5, 20261108)].cumulate_amount == 7
    (dead,) = cs.out.dead()
    assert (
        b"more than 1 day(s) after the record was received"
        in dict(dead["headers"])["coupon.error.reason"]
    )
    assert stored(cs, "days", b"~watermark") == 20261108


async def test_an_overflowing_record_is_dead_lettered_and_the_rest_flows(stream):
    big = (2**63 - 1) // 10 * 6
    await stream.stage.add(batch(row("o1", big, "x"), row("o2", big, "x")), 0, 0, "t0")
    await stream.stage.add(batch(row("o3", 1, "x", buyer=6)), 0, 1, "t1")
    await stream.checkpoint()
    assert stream.sink.table[(5, 20261111)].cumulate_amount == big
    assert stream.sink.table[(6, 20261111)].cumulate_amount == 1
    (dead,) = stream.out.dead()
    assert b"cumulate_amount would overflow BIGINT" in dict(dead["headers"])["coupon.error.reason"]
    assert group(stream).committed() == {0: 2}


async def test_a_message_skipped_by_the_consumer_is_read_back_and_applied(stream):
    """Faust has been seen to commit past, or skip, a by-buyer message around a rebalance."""
    log = stream.reader.log
    for offset, order in enumerate(["o0", "o1", "o2", "o3"]):
        log[(2, offset)] = batch(row(order, 10, "2026-11-11 00:00:01", buyer=9))
    await stream.stage.add(log[(2, 0)], 2, 0, "t0")
    await stream.stage.add(log[(2, 3)], 2, 3, "t3")  # 1 and 2 never delivered
    assert stream.reader.reads == [(2, 1, 3)]
    await stream.stage.add(log[(2, 1)], 2, 1, "t1")  # a late redelivery changes nothing
    assert stream.reader.reads == [(2, 1, 3)]
    await stream.checkpoint()
    assert stream.sink.table[(9, 20261111)].cumulate_amount == 40
    assert stream.caches["days"].store.get_many(2, [NEXT_OFFSET_KEY]) == [b"4"]
    assert group(stream).committed() == {2: 4}


async def test_after_a_rebalance_the_first_message_must_be_the_committed_one(stream):
    """A hole in a replayed range (applied before, never checkpointed) is read back."""
    log = stream.reader.log
    for offset in range(6):
        log[(1, offset)] = batch(row(f"o{offset}", 1, "2026-11-11 00:00:01", buyer=4))
    for offset in range(6):
        await stream.stage.add(log[(1, offset)], 1, offset, f"a{offset}")
        if offset == 1:
            await stream.checkpoint()  # commits 2
    await stream.stage.forget()  # rebalance before the next checkpoint
    await stream.stage.add(log[(1, 4)], 1, 4, "b4", committed=2)  # 2 and 3 not delivered
    assert stream.reader.reads[-1] == (1, 2, 4)
    await stream.stage.add(log[(1, 5)], 1, 5, "b5", committed=2)
    await stream.checkpoint()
    assert stream.sink.table[(4, 20261111)].cumulate_amount == 6  # each record once


async def test_a_tail_the_consumer_never_delivered_is_read_back_once_the_partition_is_quiet(
    stream, monkeypatch
):
    """Seen after a kill -9 takeover: the last messages of a partition were never delivered,
    and with no later message to reveal the hole, the partition stayed behind for good."""
    log = stream.reader.log
    for offset in range(4):
        log[(0, offset)] = batch(row(f"o{offset}", 5, "x", buyer=7))
    await stream.stage.add(log[(0, 0)], 0, 0, "t0")
    await stream.stage.add(log[(0, 1)], 0, 1, "t1")  # 2 and 3 never come
    await stream.checkpoint()

    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == []  # it applied a message just now: still flowing

    monkeypatch.setattr(state_stage, "QUIET_SECONDS", 0.0)
    stream.stage.pending.touched[3].update((i, 20261111) for i in range(100_000))
    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == []  # the sink is behind: no more rows now
    stream.stage.pending.touched[3].clear()

    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == [(0, 2, 4)]
    await stream.checkpoint()
    assert stream.sink.table[(7, 20261111)].cumulate_amount == 20
    assert group(stream).committed() == {0: 4}
    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == [(0, 2, 4)]  # nothing left to read


async def test_a_tail_read_back_during_a_rebalance_is_not_applied(stream, monkeypatch):
    monkeypatch.setattr(state_stage, "QUIET_SECONDS", 0.0)
    stream.reader.log[(1, 0)] = batch(row("o1", 5, "x", buyer=3))
    real_read = stream.reader.read

    async def read_while_rebalancing(*args):
        stream.app.on_rebalance_start()
        return await real_read(*args)

    stream.reader.read = read_while_rebalancing
    await stream.stage.repair_tail(1, 1, committed=0)
    assert stream.stage.pending.rows() == 0
    assert stream.stage.pending.tokens == []


async def test_a_session_starts_at_the_offset_the_group_committed_not_the_consumers_view(stream):
    """Reading back from before the committed offset would roll committed values back."""
    log = stream.reader.log
    for offset in range(4):
        log[(1, offset)] = batch(row(f"o{offset}", 1, "2026-11-11 00:00:01", buyer=4))
    await stream.stage.add(log[(1, 0)], 1, 0, "a0")
    await stream.stage.add(log[(1, 1)], 1, 1, "a1")
    await stream.checkpoint()  # commits 2
    await stream.stage.forget()  # a restart: the consumer's view is not loaded yet
    await stream.stage.add(log[(1, 3)], 1, 3, "b3", committed=None)
    assert stream.reader.reads[-1] == (1, 2, 3)  # from the group's 2, not from 0
    await stream.checkpoint()
    assert stream.sink.table[(4, 20261111)].cumulate_amount == 4


def test_a_cache_loads_each_key_once_from_the_newest_layer_that_holds_it():
    """Changed layer first, then the layer a checkpoint is writing, then one multi-get."""

    class Counting(MemoryStore):
        def __init__(self):
            super().__init__()
            self.asked = []

        def get_many(self, partition, keys):
            self.asked.append(list(keys))
            return super().get_many(partition, keys)

    store = Counting()
    session = state_stage.Session(sid=1, start=5)
    store.write(
        0, {b"stored": encode_value(1, 3, "s", None), b"ahead": encode_value(2, 9, "new", "old")}
    )
    cache = state_stage.TableCache("days", store, "days-changelog")
    cache.load(0, [b"written"], session)[b"written"][state_stage.VALUE] = "w"
    writing = cache.snapshot()  # a checkpoint is writing it
    cache.load(0, [b"changed"], session)[b"changed"][state_stage.VALUE] = "c"
    store.asked.clear()
    keys = [b"changed", b"written", b"stored", b"ahead", b"absent", b"stored", b"absent"]
    slots = cache.load(0, keys, session)
    assert store.asked == [[b"stored", b"ahead", b"absent"]]  # once each, only these
    assert slots[b"changed"] == [None, "c"]
    assert slots[b"written"] == ["w", "w"]  # as of the checkpoint being written
    assert slots[b"stored"] == ["s", "s"]
    assert slots[b"ahead"] == ["old", "old", True]  # written by a checkpoint never committed
    assert slots[b"absent"] == [None, None]
    cache.release(writing)
    store.asked.clear()
    assert cache.load(0, [b"changed", b"stored"], session) is slots
    assert store.asked == []  # all in the changed layer: no multi-get
