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
