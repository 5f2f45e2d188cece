"""The state agent and its checkpoint in Faust's in-memory test context (no broker).

Kafka output is recorded by `RecordingOut` and the database by `RecordingSink`: these stand
in for the real parts in unit tests only; the integration tests run them for real.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import ConsumerStoppedError
from faust.types import TP

from coupon_stream.app import CouponStream
from coupon_stream.core.records import decode_rows, encode_rows
from coupon_stream.core.state import (
    NEXT_OFFSET_KEY,
    STATE_TABLES,
    ResultRow,
    Versioned,
    day_key,
    entry_key,
)
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline import state_stage
from tests.unit.fakes import DownSink, FakeOut, FakeSink


class LogReader:
    """The by-buyer log as a dict of offset -> value, for the skipped-message repair."""

    def __init__(self):
        self.log: dict[tuple[int, int], bytes] = {}
        self.reads: list[tuple[int, int, int]] = []
        self.group_offsets: dict[int, int] = {}  # what the broker says the group committed

    async def committed(self, group, topic, partition):
        return self.group_offsets.get(partition)

    async def read(self, topic, partition, start, end):
        self.reads.append((partition, start, end))
        return [
            (o, self.log[(partition, o)], None)
            for o in range(start, end)
            if (partition, o) in self.log
        ]

    async def stop(self):
        pass


def make_stream(tmp_path, **settings):
    cs = CouponStream(
        Settings(app_id="unit", data_dir=tmp_path, **settings),
        store="memory://",
        sink=FakeSink(),
        out=FakeOut(),
        reader=LogReader(),
    )
    cs.app.finalize()
    cs.app.flow_control.resume()
    cs.committed = {}
    cs.stage_cache = lambda name: cs.caches[name]

    async def commit(offsets):
        for tp, offset in offsets.items():
            cs.committed[(tp.topic, tp.partition)] = offset
            cs.reader.group_offsets[tp.partition] = offset
        return True

    cs.commit = commit
    cs.out.log = lambda table, p=0: cs.out.logs[(cs.caches[table].changelog_topic, p)]
    return cs


@pytest.fixture
def stream(tmp_path):
    return make_stream(tmp_path, partitions=4)


async def put(stream, agent, value, partition=0):
    await agent.put(value, partition=partition)
    await stream.checkpoint()


def stored(stream, table, key, partition=0):
    (raw,) = stream.caches[table].store.get_many(partition, [key])
    return None if raw is None else Versioned.decode(raw).current


def row(order, yuan, gm, status="2", day=20261111, buyer=5, gc="2026-11-11 00:00:00"):
    return [buyer, order, status, day, yuan, gc, gm]


def batch(*rows):
    return encode_rows(list(rows))


async def test_state_agent_dedups_aggregates_and_deletes(stream):
    sink = stream.sink
    async with stream.state_agent.test_context() as agent:
        await put(
            stream,
            agent,
            batch(
                row("o1", 100, "2026-11-11 00:00:09"),
                row("o1", 100, "2026-11-11 00:00:01"),  # earlier copy replaces
                row("o2", 7, "2026-11-11 00:00:02", buyer=6),
            ),
        )
        assert sink.table == {
            (5, 20261111): ResultRow(
                "2026-11-11 00:00:00", "2026-11-11 00:00:01", 5, 100, 20261111
            ),
            (6, 20261111): ResultRow("2026-11-11 00:00:00", "2026-11-11 00:00:02", 6, 7, 20261111),
        }
        assert stored(stream, "entries", entry_key(5, "o1", "2"))[3] == "2026-11-11 00:00:01"
        # each changed key once per checkpoint, as RocksDB holds it, and the next offset
        days_log = stream.out.log("days")
        assert sorted(k for k, _ in days_log) == sorted(
            [day_key(5, 20261111), day_key(6, 20261111), b"~format", NEXT_OFFSET_KEY]
        )
        assert len(stream.out.log("entries")) == 2
        await put(stream, agent, batch(row("o1", -100, "2026-11-11 01:00:00", "4")))
        assert (5, 20261111) not in sink.table
        writes = sink.writes
        # a replayed duplicate re-sends its key's current state
        await put(stream, agent, batch(row("o2", 7, "2026-11-11 00:00:02", buyer=6)))
        assert sink.writes == writes + 1
        assert sink.table[(6, 20261111)].cumulate_amount == 7


async def test_retention_expires_old_days_and_dead_letters_late_and_future_records(tmp_path):
    cs = make_stream(tmp_path, partitions=1, state_retention_days=2)
    async with cs.state_agent.test_context() as agent:
        for day in (20261101, 20261102, 20261103):
            await put(cs, agent, batch(row(f"o{day}", 5, "x", day=day, buyer=1)))
        await put(cs, agent, batch(row("n", 5, "x", day=20261104, buyer=2)))
        # watermark 20261104, 2 days kept -> cutoff 20261102: day 1 dropped from state
        assert stored(cs, "entries", entry_key(1, "o20261101", "2")) is None
        assert stored(cs, "days", day_key(1, 20261101)) is None
        assert stored(cs, "days", day_key(1, 20261102))[0] == 5
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5  # the closed day's row stays
        await put(cs, agent, batch(row("late", -5, "y", "4", 20261101, buyer=1)))
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5
        dead = cs.out.dead()
        assert len(dead) == 1
        reason = dict(dead[0]["headers"])["coupon.error.reason"]
        assert b"older than the retention cutoff 20261102" in reason
        assert decode_rows(dead[0]["value"])[0][1] == "late"


async def test_a_future_date_under_retention_is_dead_lettered_not_a_watermark(tmp_path):
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
    assert stream.committed == {(stream.settings.by_buyer_topic, 0): 2}


async def test_a_failed_changelog_send_is_sent_again_before_anything_is_committed(stream):
    retries = metrics.CHANGELOG_RETRIES._value.get()
    async with stream.state_agent.test_context() as agent:
        stream.out.fail_next = True
        await agent.put(batch(row("o1", 100, "2026-11-11 00:00:09")))
        await agent.put(batch(row("o2", 1, "2026-11-11 00:00:10")))
        await stream.checkpoint()
    assert metrics.CHANGELOG_RETRIES._value.get() == retries + 1
    log = dict(stream.out.log("days"))
    raw = log[day_key(5, 20261111)]
    assert Versioned.decode(raw).current[0] == 101
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    store = stream.caches["days"].store
    assert store.offsets[0] == len(stream.out.log("days")) - 1


async def test_a_refused_changelog_append_is_retried_and_the_agent_lives_on(stream):
    retries = metrics.CHANGELOG_RETRIES._value.get()
    async with stream.state_agent.test_context() as agent:
        stream.out.refuse_next = True
        for order, yuan, second in (("o1", 100, 9), ("o2", 1, 10)):
            await put(stream, agent, batch(row(order, yuan, f"2026-11-11 00:00:{second:02d}")))
    assert metrics.CHANGELOG_RETRIES._value.get() == retries + 1
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    assert stream.committed == {(stream.settings.by_buyer_topic, 0): 2}


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
    assert stream.committed == {(stream.settings.by_buyer_topic, 2): 4}


def test_the_changelog_topics_the_worker_precreates_are_the_tables(stream):
    assert {c.changelog_topic for c in stream.caches.values()} == set(
        stream.settings.changelog_topics.values()
    )
    assert set(stream.caches) == set(STATE_TABLES)


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


async def test_the_state_agent_commits_what_it_checkpointed(stream):
    async with stream.state_agent.test_context() as agent:
        await put(stream, agent, batch(row("o1", 1, "x")), partition=3)
        await put(stream, agent, batch(row("o2", 1, "x")), partition=3)
    (((topic, partition), offset),) = stream.committed.items()
    assert partition == 3 and offset == 2


async def test_a_write_retrying_when_a_rebalance_starts_is_given_up_uncommitted(tmp_path):
    """A late write could land after the partitions' next owner's; it replays instead."""
    cs = make_stream(tmp_path, partitions=1)
    cs.sink = cs.checkpointer.sink = DownSink()
    await cs.stage.add(batch(row("o1", 100, "x")), 0, 0, "t0")
    checkpoint = asyncio.ensure_future(cs.checkpoint())
    await cs.sink.attempting.wait()
    cs.app.on_rebalance_start()
    await asyncio.wait_for(checkpoint, 5)
    assert cs.sink.table == {} and cs.committed == {}
    assert cs.stage.sessions == {}  # its partitions start over from the committed offset
    # the state and its changelog keep the record, written past the committed offset
    assert stored(cs, "days", day_key(5, 20261111))[0] == 100


async def test_a_shutdown_during_a_bulk_restore_ends_it_without_a_crash(tmp_path, caplog):
    """SIGTERM while an assignment reads changelogs in bulk: the reader is stopped under it."""

    class StoppedReader:
        async def end_offsets(self, topic, partitions):
            return {p: 50_000 for p in partitions}

        async def batches(self, topic, ranges):
            raise ConsumerStoppedError()
            yield  # an async generator, like PartitionReader.batches

    cs = make_stream(tmp_path, partitions=2)
    cs.restore_reader = StoppedReader()
    changelog = cs.caches["entries"].changelog_topic
    tps = {TP(changelog, 0), TP(changelog, 1)}
    cs.app.assignor.assigned_actives = lambda: tps
    with caplog.at_level("INFO", logger="coupon_stream.app"):
        await cs._bulk_restore(changelog, tps, generation_id=cs.app.consumer_generation_id)
    assert "bulk restore stopped: the worker is shutting down" in caplog.text


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
    assert stream.committed == {(stream.settings.by_buyer_topic, 0): 4}
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


async def test_readiness_reports_a_stalled_partition(stream):
    now = [0.0]
    stream.stalls._clock = lambda: now[0]
    stream.stalls.assigned([0])
    now[0] = 10**6  # long after the assignment, nothing committed
    stream.stalls.check({0: 5})
    status = await stream.readiness()
    assert status["stalled_partitions"] == [0] and not status["ready"]


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
