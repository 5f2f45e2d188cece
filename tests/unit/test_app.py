"""The Faust agents in Faust's in-memory test context (no broker): wiring around pure logic."""

from __future__ import annotations

import orjson
import pytest

from coupon_stream.app import CouponStream
from coupon_stream.records import Contribution, Source, partition_for_buyer
from coupon_stream.settings import Settings
from coupon_stream.state import BuyerState, ResultRow, buyer_key, decode_batch, encode_batch


class RecordingSink:
    """Stands in for the database in these unit tests only; integration tests use MariaDB."""

    def __init__(self):
        self.table: dict[tuple[int, int], ResultRow] = {}
        self.writes = 0

    async def start(self):
        pass

    async def ping(self):
        return True

    async def write(self, rows):
        self.writes += 1
        for key, row in rows.items():
            if row is None:
                self.table.pop(key, None)
            else:
                self.table[key] = row


@pytest.fixture
def stream(tmp_path):
    cs = CouponStream(
        Settings(app_id="unit", data_dir=tmp_path, partitions=4),
        store="memory://",
        sink=RecordingSink(),
    )
    cs.app.finalize()
    cs.app.flow_control.resume()
    return cs


async def put(stream, agent, value):
    await agent.put(value)
    await stream.flush()


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
        stored = BuyerState.decode(5, stream.buyers[buyer_key(5)])
        assert [c.gmt_modified for c in stored.kept.values()] == ["2026-11-11 00:00:01"]
        await put(
            stream, agent, encode_batch([(5, contribution("o1", -100, "2026-11-11 01:00:00", "4"))])
        )
        assert (5, 20261111) not in sink.table
        writes = sink.writes
        # a replayed duplicate re-sends its key's current state
        await put(stream, agent, encode_batch([(6, contribution("o2", 7, "2026-11-11 00:00:02"))]))
        assert sink.writes == writes + 1
        assert sink.table[(6, 20261111)].cumulate_amount == 7


class FakeEvent:
    def __init__(self, value, offset, topic="orders"):
        self.message = type(
            "M", (), {"value": value, "key": b"k", "topic": topic, "partition": 0, "offset": offset}
        )()


async def test_intake_routes_by_buyer_partition_and_dead_letters(stream):
    sent = []

    async def by_buyer_send(**kw):
        sent.append(("by_buyer", kw))

    async def dlq_send(**kw):
        sent.append(("dlq", kw))

    stream.by_buyer.send = by_buyer_send
    stream.dead_letters.send = dlq_send
    good = [
        orjson.dumps(
            {
                "biz_order_id": f"o{i}",
                "pay_status": "2",
                "buyer_id": str(b),
                "pay_time": "2026-11-11 10:00:00",
                "div_idx_actual_total_fee": 12399,
            }
        )
        for i, b in enumerate([1, 2, 3, 1, 99])
    ]
    events = [FakeEvent(v, i) for i, v in enumerate(good)] + [FakeEvent(b"{oops", 5)]
    await stream.forward(events, Source.ORDERS)
    batches = [kw for kind, kw in sent if kind == "by_buyer"]
    routed = {}
    for kw in batches:
        for buyer, c in decode_batch(kw["value"]):
            assert partition_for_buyer(buyer, 4) == kw["partition"]
            routed.setdefault(buyer, []).append(c.biz_order_id)
            assert c.yuan == 123 and c.effect_time == 20261111
    assert routed == {1: ["o0", "o3"], 2: ["o1"], 3: ["o2"], 99: ["o4"]}
    (dead,) = [kw for kind, kw in sent if kind == "dlq"]
    assert dead["value"] == b"{oops"
    headers = dict(dead["headers"])
    assert headers["coupon.source.offset"] == b"5"
    assert b"not valid UTF-8 JSON" in headers["coupon.error.reason"]


async def test_retention_expires_old_days_and_dead_letters_late_records(tmp_path):
    cs = CouponStream(
        Settings(app_id="unit-ret", data_dir=tmp_path, partitions=1, state_retention_days=2),
        store="memory://",
        sink=RecordingSink(),
    )
    cs.app.finalize()
    cs.app.flow_control.resume()
    dead = []

    async def dlq_send(**kw):
        dead.append(kw)

    cs.dead_letters.send = dlq_send
    async with cs.state_agent.test_context() as agent:
        for day in (20261101, 20261102, 20261103):
            await put(cs, agent, encode_batch([(1, contribution(f"o{day}", 5, "x", day=day))]))
        stored = BuyerState.decode(1, cs.buyers[buyer_key(1)])
        assert sorted(c.effect_time for c in stored.kept.values()) == [20261101, 20261102, 20261103]
        await put(cs, agent, encode_batch([(2, contribution("n", 5, "x", day=20261104))]))
        # watermark 20261104, 2 days kept -> cutoff 20261102: day 1 dropped from state
        stored = BuyerState.decode(1, cs.buyers[buyer_key(1)])
        assert sorted(c.effect_time for c in stored.kept.values()) == [20261102, 20261103]
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5  # the closed day's row stays
        await put(cs, agent, encode_batch([(1, contribution("late", -5, "y", "4", 20261101))]))
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5
        assert len(dead) == 1
        assert (
            b"older than the retention cutoff 20261102"
            in dict(dead[0]["headers"])["coupon.error.reason"]
        )
        assert decode_batch(dead[0]["value"])[0][1].biz_order_id == "late"


def test_the_changelog_topic_the_worker_precreates_is_the_tables(stream):
    assert stream.buyers.changelog_topic.get_topic_name() == stream.settings.changelog_topic
