"""Bounded state: with a retention of 2 days, a simulated week keeps state size flat."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from tests import reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def day_records(
    day: int, n: int, rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    date = f"2026-11-{day:02d}"
    orders, refunds = [], []
    for i in range(n):
        order: dict[str, Any] = {
            "biz_order_id": f"d{day}-{i}",
            "pay_status": "2",
            "buyer_id": str(rng.randrange(400)),
            "pay_time": f"{date} 10:{i % 60:02d}:00",
            "gmt_create": f"{date} 09:00:00",
            "gmt_modified": f"{date} 10:00:00",
            "div_idx_actual_total_fee": rng.randint(100, 90_000),
        }
        orders.append(order)
        if rng.random() < 0.2:
            refunds.append(
                dict(
                    order,
                    pay_status="4",
                    gmt_modified=f"{date} 12:00:00",
                    refund_fee=-order["div_idx_actual_total_fee"],
                )
            )
    return orders, refunds


async def test_a_week_of_days_keeps_state_flat_and_closes_old_days(pipeline):
    p = pipeline
    p.partitions = 2
    p.extra_env["COUPON_STATE_RETENTION_DAYS"] = "2"
    await p.create_topics(1, 1)
    worker = p.start_worker()
    rng = random.Random(4)
    all_orders, all_refunds, sizes = [], [], []
    for day in range(1, 8):
        orders, refunds = day_records(day, 1500, rng)
        all_orders += orders
        all_refunds += refunds
        await p.produce(
            [(p.orders_topic, None, orjson.dumps(o)) for o in orders]
            + [(p.refunds_topic, None, orjson.dumps(r)) for r in refunds]
        )
        await p.wait_quiescent()
        sizes.append(await p.metric(worker, "coupon_state_entries"))
    # A sweep runs when a partition's newest day advances; it counts what it keeps: the
    # two previous days, so from day 3 on the size stays about two days' worth.
    per_day = 1500 * 1.2
    assert max(sizes[2:]) <= 2 * per_day * 1.1, sizes
    assert min(sizes[2:]) >= 2 * per_day * 0.9, sizes
    assert await p.metric(worker, "coupon_state_expired_records_total") >= 3 * per_day * 0.9

    # A refund for a closed day is not matched against dropped state: dead-lettered, and
    # the day's row stays as it was.
    late = dict(all_orders[0], pay_status="4", refund_fee=-10_000_000.0)
    await p.produce([(p.refunds_topic, None, orjson.dumps(late))])
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(all_orders, all_refunds)
    await p.assert_grants_agree()
    letters = await p.dead_letters()
    assert len(letters) == 1
    assert b"retention cutoff" in letters[0][1]["coupon.error.reason"]
