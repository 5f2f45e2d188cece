"""The state agent in Faust's in-memory test context (no broker), and intake routing.

Kafka output is recorded by `RecordingOut` and the database by `RecordingSink`: these stand
in for the real parts in unit tests only; the integration tests run them for real.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaTimeoutError
from faust.types import TP

from coupon_stream import metrics, state_stage
from coupon_stream.app import CouponStream
from coupon_stream.intake import Intake, encode_rows, route
from coupon_stream.records import Contribution, Source, partition_for_buyer
from coupon_stream.settings import Settings
from coupon_stream.state import BuyerState, ResultRow, buyer_key, decode_batch, encode_batch


class RecordingSink:
    def __init__(self):
        self.table: dict[tuple[int, int], ResultRow] = {}
        self.writes = 0

    async def start(self):
        pass

    async def ping(self):
        return True

    async def write(self, rows, still_wanted=None):
        self.writes += 1
        for key, row in rows.items():
            if row is None:
                self.table.pop(key, None)
            else:
                self.table[key] = row
        return True


class DownSink(RecordingSink):
    """A database that is down: every attempt fails until the write is no longer wanted."""

    def __init__(self):
        super().__init__()
        self.attempts = 0
        self.attempting = asyncio.Event()

    async def write(self, rows, still_wanted=None):
        while still_wanted is None or still_wanted():
            self.attempts += 1
            self.attempting.set()
            await asyncio.sleep(0.01)
        return False


class Meta:
    def __init__(self, offset):
        self.offset = offset


class RecordingOut:
    """Records what would go to Kafka.

    `fail_next` makes the next changelog batch fail once after it was sent; `refuse_next`
    makes the next append raise, as aiokafka does when it cannot queue a batch in time.
    """

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []
        self.changelog: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self.fail_next = False
        self.refuse_next = False

    def _done(self, value=None, exc=None):
        fut = asyncio.get_running_loop().create_future()
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
        return fut

    async def send(self, topic, value, **kw):
        self.sent.append((topic, {"value": value, **kw}))
        return self._done(Meta(len(self.sent)))

    async def dead_letter(self, dead):
        return await self.send("dlq", dead.value, key=dead.key, headers=dead.headers())

    async def send_records(self, topic, partition, records):
        records = list(records)
        if self.refuse_next:
            self.refuse_next = False
            raise KafkaTimeoutError()
        if self.fail_next:
            self.fail_next = False
            return [(self._done(exc=KafkaTimeoutError()), len(records))]
        log = self.changelog.setdefault(partition, [])
        first = len(log)
        log.extend(records)
        return [(self._done(Meta(first)), len(records))]


class LogReader:
    """The by-buyer log as a dict of offset -> value, for the skipped-message repair."""

    def __init__(self):
        self.log: dict[tuple[int, int], bytes] = {}
        self.reads: list[tuple[int, int, int]] = []

    async def read(self, topic, partition, start, end):
        self.reads.append((partition, start, end))
        return [
            (o, self.log[(partition, o)]) for o in range(start, end) if (partition, o) in self.log
        ]

    async def stop(self):
        pass


def make_stream(tmp_path, **settings):
    cs = CouponStream(
        Settings(app_id="unit", data_dir=tmp_path, **settings),
        store="memory://",
        sink=RecordingSink(),
        out=RecordingOut(),
        reader=LogReader(),
    )
    cs.app.finalize()
    cs.app.flow_control.resume()
    cs.committed = {}

    async def commit(offsets):
        for tp, offset in offsets.items():
            cs.committed[(tp.topic, tp.partition)] = offset

    cs.commit = commit
    return cs


@pytest.fixture
def stream(tmp_path):
    return make_stream(tmp_path, partitions=4)


async def put(stream, agent, value, partition=0):
    await agent.put(value, partition=partition)
    await stream.flush()


def stored(stream, buyer, partition=0):
    (raw,) = stream.stage.store.get_many(partition, [buyer_key(buyer)])
    return BuyerState.decode(buyer, raw)


def contribution(order, yuan, gm, status="2", day=20261111):
    return Contribution(order, status, day, yuan, "2026-11-11 00:00:00", gm)


async def test_state_agent_dedups_aggregates_and_deletes(stream):
    sink = stream.sink
    async with stream.state_agent.test_context() as agent:
        await put(
            stream,
            agent,
            encode_batch(
                [
                    (5, contribution("o1", 100, "2026-11-11 00:00:09")),
                    (5, contribution("o1", 100, "2026-11-11 00:00:01")),  # earlier copy replaces
                    (6, contribution("o2", 7, "2026-11-11 00:00:02")),
                ]
            ),
        )
        assert sink.table == {
            (5, 20261111): ResultRow(
                "2026-11-11 00:00:00", "2026-11-11 00:00:01", 5, 100, 20261111
            ),
            (6, 20261111): ResultRow("2026-11-11 00:00:00", "2026-11-11 00:00:02", 6, 7, 20261111),
        }
        kept = stored(stream, 5).kept.values()
        assert [Contribution(*c).gmt_modified for c in kept] == ["2026-11-11 00:00:01"]
        # the changelog carries what RocksDB holds: each buyer once, and the next offset
        log = stream.out.changelog[0]
        assert sorted(k for k, _ in log) == [buyer_key(5), buyer_key(6), b"~next-offset"]
        assert dict(log)[buyer_key(5)] == stored(stream, 5).encode()
        await put(
            stream, agent, encode_batch([(5, contribution("o1", -100, "2026-11-11 01:00:00", "4"))])
        )
        assert (5, 20261111) not in sink.table
        writes = sink.writes
        # a replayed duplicate re-sends its key's current state
        await put(stream, agent, encode_batch([(6, contribution("o2", 7, "2026-11-11 00:00:02"))]))
        assert sink.writes == writes + 1
        assert sink.table[(6, 20261111)].cumulate_amount == 7


async def test_retention_expires_old_days_and_dead_letters_late_records(tmp_path):
    cs = make_stream(tmp_path, partitions=1, state_retention_days=2)
    async with cs.state_agent.test_context() as agent:
        for day in (20261101, 20261102, 20261103):
            await put(cs, agent, encode_batch([(1, contribution(f"o{day}", 5, "x", day=day))]))
        days = sorted(c[2] for c in stored(cs, 1).kept.values())
        assert days == [20261101, 20261102, 20261103]
        await put(cs, agent, encode_batch([(2, contribution("n", 5, "x", day=20261104))]))
        # watermark 20261104, 2 days kept -> cutoff 20261102: day 1 dropped from state
        assert sorted(c[2] for c in stored(cs, 1).kept.values()) == [20261102, 20261103]
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5  # the closed day's row stays
        await put(cs, agent, encode_batch([(1, contribution("late", -5, "y", "4", 20261101))]))
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5
        dead = [kw for topic, kw in cs.out.sent if topic == "dlq"]
        assert len(dead) == 1
        reason = dict(dead[0]["headers"])["coupon.error.reason"]
        assert b"older than the retention cutoff 20261102" in reason
        assert decode_batch(dead[0]["value"])[0][1][0] == "late"


async def test_failed_changelog_send_is_resent_with_current_values_before_ack(stream):
    async with stream.state_agent.test_context() as agent:
        stream.out.fail_next = True
        await agent.put(encode_batch([(5, contribution("o1", 100, "2026-11-11 00:00:09"))]))
        # a newer value of the same buyer is written before the failure is seen
        await agent.put(encode_batch([(5, contribution("o2", 1, "2026-11-11 00:00:10"))]))
        await stream.flush()
    log = dict(stream.out.changelog[0])  # the last value of each key
    assert log[buyer_key(5)] == stored(stream, 5).encode()
    assert len(stored(stream, 5).kept) == 2
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    assert stream.stage.store.offsets[0] == len(stream.out.changelog[0]) - 1


async def test_refused_changelog_append_is_sent_at_flush_and_the_agent_lives_on(stream):
    retries = metrics.CHANGELOG_RETRIES._value.get()
    async with stream.state_agent.test_context() as agent:
        stream.out.refuse_next = True
        for order, yuan, second in (("o1", 100, 9), ("o2", 1, 10)):
            gm = f"2026-11-11 00:00:{second:02d}"
            await put(stream, agent, encode_batch([(5, contribution(order, yuan, gm))]))
    assert metrics.CHANGELOG_RETRIES._value.get() == retries + 1
    log = stream.out.changelog[0]
    assert dict(log)[buyer_key(5)] == stored(stream, 5).encode()
    assert len(stored(stream, 5).kept) == 2
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    assert stream.committed == {(stream.settings.by_buyer_topic, 0): 2}


class Record:
    def __init__(self, topic, offset, value, partition=0):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value = b"k", value


def order(i, buyer):
    return orjson.dumps(
        {
            "biz_order_id": f"o{i}",
            "pay_status": "2",
            "buyer_id": str(buyer),
            "pay_time": "2026-11-11 10:00:00",
            "div_idx_actual_total_fee": 12399,
        }
    )


async def test_intake_routes_by_buyer_partition_and_dead_letters():
    s = Settings(app_id="unit", partitions=4, orders_topic="orders")
    out = RecordingOut()
    intake = Intake(s, out)
    tp = TopicPartition("orders", 0)
    batch = [Record("orders", i, order(i, b)) for i, b in enumerate([1, 2, 3, 1, 99])]
    await intake.forward({tp: [*batch, Record("orders", 5, b"{oops")]})
    routed = {}
    for topic, kw in out.sent:
        if topic != s.by_buyer_topic:
            continue
        for buyer, entry in decode_batch(kw["value"]):
            c = Contribution(*entry)
            assert partition_for_buyer(buyer, 4) == kw["partition"]
            routed.setdefault(buyer, []).append(c.biz_order_id)
            assert c.yuan == 123 and c.effect_time == 20261111
    assert routed == {1: ["o0", "o3"], 2: ["o1"], 3: ["o2"], 99: ["o4"]}
    (dead,) = [kw for topic, kw in out.sent if topic == "dlq"]
    assert dead["value"] == b"{oops"
    headers = dict(dead["headers"])
    assert headers["coupon.source.offset"] == b"5"
    assert b"not valid UTF-8 JSON" in headers["coupon.error.reason"]


def test_route_keeps_arrival_order_within_a_partition():
    msgs = [Record("r", i, order(i, 7)) for i in range(5)]
    routed = route(msgs, {"r": Source.ORDERS}, 3)
    (rows,) = routed.by_partition.values()
    assert [r[1] for r in rows] == ["o0", "o1", "o2", "o3", "o4"]


def test_encode_rows_splits_messages_that_would_be_too_large():
    rows = [(i, "x" * 100, "2", 20261111, 1, None, None) for i in range(1000)]
    values = encode_rows(rows, limit=10_000)
    assert all(len(v) <= 10_000 for v in values) and len(values) > 1
    assert [tuple(r) for v in values for r in orjson.loads(v)] == rows


async def test_a_message_skipped_by_the_consumer_is_read_back_and_applied(stream):
    """Faust has been seen to commit past, or skip, a by-buyer message around a rebalance."""
    log = stream.reader.log
    for offset, order in enumerate(["o0", "o1", "o2", "o3"]):
        log[(2, offset)] = encode_batch([(9, contribution(order, 10, "2026-11-11 00:00:01"))])
    await stream.stage.add(log[(2, 0)], 2, 0, "t0")
    await stream.stage.add(log[(2, 3)], 2, 3, "t3")  # 1 and 2 never delivered
    assert stream.reader.reads == [(2, 1, 3)]
    await stream.stage.add(log[(2, 1)], 2, 1, "t1")  # a late replay changes nothing
    assert stream.reader.reads == [(2, 1, 3)]
    assert await stream.stage.flush() == (["t0", "t3", "t1"], True)
    assert sorted(k[0] for k in stored(stream, 9, partition=2).kept) == ["o0", "o1", "o2", "o3"]
    assert stream.sink.table[(9, 20261111)].cumulate_amount == 40
    assert stream.stage.store.get_many(2, [b"~next-offset"]) == [b"4"]


def test_the_changelog_topic_the_worker_precreates_is_the_tables(stream):
    assert stream.buyers.changelog_topic.get_topic_name() == stream.settings.changelog_topic


async def test_after_a_rebalance_the_first_message_must_be_the_committed_one(stream):
    """A hole in a replayed range (applied before, rows maybe never flushed) is read back."""
    log = stream.reader.log
    for offset in range(6):
        log[(1, offset)] = encode_batch([(4, contribution(f"o{offset}", 1, "2026-11-11 00:00:01"))])
    for offset in range(6):
        await stream.stage.add(log[(1, offset)], 1, offset, f"a{offset}")
    stream.stage.forget_deliveries()  # rebalance; the group had committed 2
    await stream.stage.add(log[(1, 4)], 1, 4, "b4", committed=2)  # 2 and 3 not delivered
    assert stream.reader.reads[-1] == (1, 2, 4)
    assert stream.stage.pending.rows[(4, 20261111)].cumulate_amount == 6


async def test_the_state_agent_commits_what_it_flushed(stream):
    async with stream.state_agent.test_context() as agent:
        await put(stream, agent, encode_batch([(5, contribution("o1", 1, "x"))]), partition=3)
        await put(stream, agent, encode_batch([(5, contribution("o2", 1, "x"))]), partition=3)
    (((topic, partition), offset),) = stream.committed.items()
    assert partition == 3 and offset == 2


async def test_a_write_retrying_when_a_rebalance_starts_is_given_up_uncommitted(tmp_path):
    """A late write could land after the partitions' next owner's; it replays instead."""
    cs = make_stream(tmp_path, partitions=1)
    cs.sink = cs.stage.sink = DownSink()
    await cs.stage.add(encode_batch([(5, contribution("o1", 100, "x"))]), 0, 0, "t0")
    flush = asyncio.ensure_future(cs.stage.flush())
    await cs.sink.attempting.wait()
    cs.app.on_rebalance_start()
    assert await asyncio.wait_for(flush, 5) == (["t0"], False)
    assert cs.sink.table == {}
    assert stored(cs, 5).kept  # the state and its changelog keep the record
    assert cs.stage.store.offsets[0] == len(cs.out.changelog[0]) - 1


async def test_intake_sends_a_refused_batch_again_before_it_commits():
    s = Settings(app_id="unit", partitions=2, orders_topic="orders")
    out = RecordingOut()
    real_send = out.send
    refusals = []

    async def send(topic, value, **kw):
        if not refusals:
            refusals.append(topic)
            return out._done(exc=KafkaTimeoutError())
        return await real_send(topic, value, **kw)

    out.send = send
    intake = Intake(s, out)
    await intake.forward_until_sent(
        {TopicPartition("orders", 0): [Record("orders", 0, order(0, 7))]}
    )
    assert refusals == [s.by_buyer_topic]
    (sent,) = [kw for topic, kw in out.sent if topic == s.by_buyer_topic]
    assert decode_batch(sent["value"])[0][0] == 7


async def test_intake_lag_counts_from_the_committed_offset_after_an_assignment():
    class Consumer:
        async def committed(self, tp):
            return {0: 40, 1: None}[tp.partition]

        def assignment(self):
            return {TopicPartition("orders", 0), TopicPartition("orders", 1)}

        def highwater(self, tp):
            return 100

    intake = Intake(Settings(app_id="unit", orders_topic="orders"), RecordingOut())
    intake.consumer = Consumer()
    await intake.load_committed(intake.consumer.assignment())
    # partition 1 has no commit yet: the group starts it at the beginning of the log
    assert intake.lag() == {TopicPartition("orders", 0): 60, TopicPartition("orders", 1): 100}


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
    changelog = cs.stage.changelog_topic
    tps = {TP(changelog, 0), TP(changelog, 1)}
    cs.app.assignor.assigned_actives = lambda: tps
    with caplog.at_level("INFO", logger="coupon_stream.app"):
        await cs._bulk_restore(tps, generation_id=cs.app.consumer_generation_id)
    assert "bulk restore stopped: the worker is shutting down" in caplog.text


async def test_a_tail_the_consumer_never_delivered_is_read_back_once_the_partition_is_quiet(
    stream, monkeypatch
):
    """Seen after a kill -9 takeover: the last messages of a partition were never delivered,
    and with no later message to reveal the hole, the partition stayed behind for good."""
    log = stream.reader.log
    for offset in range(4):
        log[(0, offset)] = encode_batch([(7, contribution(f"o{offset}", 5, "x"))])
    await stream.stage.add(log[(0, 0)], 0, 0, "t0")
    await stream.stage.add(log[(0, 1)], 0, 1, "t1")  # 2 and 3 never come
    assert await stream.stage.flush() == (["t0", "t1"], True)

    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == []  # it applied a message just now: still flowing

    monkeypatch.setattr(state_stage, "QUIET_SECONDS", 0.0)
    stream.stage.pending.rows.update({(i, 20261111): None for i in range(100_000)})
    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == []  # the sink is behind: no more rows now
    stream.stage.pending.rows.clear()

    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == [(0, 2, 4)]
    assert stream.stage.pending.rows[(7, 20261111)].cumulate_amount == 20
    await stream.flush()
    assert stream.committed == {(stream.settings.by_buyer_topic, 0): 4}
    await stream.stage.repair_tail(0, 4, committed=0)
    assert stream.reader.reads == [(0, 2, 4)]  # nothing left to read


async def test_a_tail_read_back_during_a_rebalance_is_not_applied(stream, monkeypatch):
    monkeypatch.setattr(state_stage, "QUIET_SECONDS", 0.0)
    stream.reader.log[(1, 0)] = encode_batch([(3, contribution("o1", 5, "x"))])
    real_read = stream.reader.read

    async def read_while_rebalancing(*args):
        stream.app.on_rebalance_start()
        return await real_read(*args)

    stream.reader.read = read_while_rebalancing
    await stream.stage.repair_tail(1, 1, committed=0)
    assert stream.stage.pending.rows == {}
    assert stored(stream, 3, partition=1).kept == {}
