"""A worker cut off from the brokers while the database stays reachable: fenced, then back.

Worker A reaches Kafka only through toxiproxy (tests/integration/toxiproxy.py); worker B,
the test and MariaDB do not. A's link is cut or held past the session timeout while A has
a checkpoint in flight and input flows; B takes A's partitions over and finishes. When the
link heals, A's checkpoint must land nowhere, A must join again and hold partitions, and
the table must equal the reference SQL. A slow link and connection resets along the way
must change nothing but speed.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests import reference
from tests.integration.harness import SESSION_TIMEOUT, Pipeline, Worker, record, until
from tests.integration.test_faults import load
from tests.integration.toxiproxy import MYSQL_DIRECT, MYSQL_PROXY, PROXIED_BOOTSTRAP

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CUT_FOR = SESSION_TIMEOUT + 8  # the group has dropped A and B owns its partitions
BACK_WITHIN = SESSION_TIMEOUT + 10  # A holds partitions again this soon after the link heals


async def held_by(p: Pipeline, worker: Worker) -> list[int] | None:
    """The by-buyer partitions the worker holds as a member of the state group; None if it
    is not a member."""
    for m in await p.group_members():
        if m.is_worker(worker):
            return m.assignment.get(p.by_buyer_topic, [])
    return None


async def _intake_cut_off(p: Pipeline, worker: Worker) -> bool:
    """The worker's readiness says its own intake is not ready (not a member of the intake
    group, or a batch in flight past the session timeout)."""
    status, body = await p.http_get(worker, "/health/ready")
    return status == 503 and json.loads(body)["intake"]["ready"] is False


@pytest.mark.parametrize("fault", ["cut", "hold"])
async def test_a_worker_cut_off_from_kafka_is_fenced_and_comes_back(pipeline, kafka_proxy, fault):
    """`cut`: A's packets dropped (a timeout toxic), its connections closed when the link
    heals; `hold`: delivered late, in order, on the same connections (A's transaction commit
    reaches the broker after B's claim)."""
    p = pipeline
    p.partitions = 8
    data, bad, thirds = await load(p, orders=40_000, in_parts=(4, 4), parts=3, skew="zipf")
    expected = reference.evaluate(data.orders, data.refunds)
    # A checkpoints every second rather than every 0.2 s: rows pile up between its
    # checkpoints, so that the link goes while it has a checkpoint's worth in flight.
    a = p.start_worker(
        0,
        env={"COUPON_BROKER": f"kafka://{PROXIED_BOOTSTRAP}", "COUPON_FLUSH_INTERVAL": "1"},
    )
    b = p.start_worker(1)
    await p.wait_ready(a)
    await p.wait_ready(b)

    with kafka_proxy.latency(150, jitter=50):  # a slow link: slower, nothing else
        await p.produce(thirds[0])
        await p.wait_quiescent()
    with kafka_proxy.reset_peer():  # connections reset on their next request
        await asyncio.sleep(3)
    await p.wait_ready(a, timeout=60)

    # A is busy when its link goes: thousands of rows wait for its next checkpoint.
    producing = asyncio.ensure_future(p.produce(thirds[1]))
    await until(lambda: _rows_in_flight(p, a, 500), 60, "A never had rows in flight", every=0.02)
    toxic = kafka_proxy.cut() if fault == "cut" else kafka_proxy.hold()
    with toxic:
        cut_at = time.monotonic()
        await producing
        await p.produce(thirds[2])  # the input flows on, through B
        await until(lambda: _not_member(p, a), CUT_FOR + 20, "A dropped from the group")
        status, body = await p.http_get(a, "/health/ready")
        # A's intake, cut off as well, has lost the intake group too: readiness says so.
        left = cut_at + CUT_FOR - time.monotonic()
        await until(lambda: _intake_cut_off(p, a), left, "A's intake not ready in its health")
        await asyncio.sleep(max(0.0, cut_at + CUT_FOR - time.monotonic()))
        await p.wait_quiescent(timeout=240)  # B alone, A's partitions restored and applied
        assert await p.table_rows() == expected
    await p.assert_grants_agree()
    healed = time.monotonic()
    cut_s = round(healed - cut_at, 1)
    assert status == 503 and b"out_of_group" in body, body

    back_s = await until(lambda: _holds(p, a), BACK_WITHIN, "A holding partitions again")
    await asyncio.sleep(30)
    assert await p.table_rows() == expected
    await p.assert_grants_agree()
    p.assert_workers_alive()
    # A's checkpoint in flight was refused by whichever store it reached after B's claim:
    # the changelogs, the result table, or the group's offsets.
    fenced = await p.metric(a, "coupon_checkpoints_fenced_total")
    assert fenced >= 1, "A's checkpoint in flight was not refused:\n" + a.tail(30)
    status, body = await p.http_get(a, "/health/ready")  # its intake back in its group too
    assert status == 200 and json.loads(body)["intake"]["member"] is True, body
    record(
        f"network partition ({fault}) of 1 of 2 workers from Kafka past the session timeout",
        messages=len(data.orders) + len(data.refunds) + len(bad),
        cut_s=cut_s,
        back_in_group_with_partitions_s=round(back_s, 1),
        checkpoints_fenced=fenced,
        equal=True,
    )
    assert sorted(set(v for v, _ in await p.dead_letters())) == sorted(set(bad))


async def _rows_in_flight(p: Pipeline, worker: Worker, at_least: int) -> bool:
    return await p.metric(worker, "coupon_sink_pending_rows") >= at_least


async def _not_member(p: Pipeline, worker: Worker) -> bool:
    return await held_by(p, worker) is None


async def _holds(p: Pipeline, worker: Worker) -> bool:
    return bool(await held_by(p, worker))


@pytest.mark.parametrize("fault", ["cut", "hold"])
async def test_a_worker_cut_off_from_the_database_while_its_partitions_move(
    pipeline, mysql_proxy, fault
):
    """A's link to MariaDB fails while A has a checkpoint in flight, and a third worker joins
    meanwhile: A's partitions move under a write that hangs. `cut`: every byte dropped,
    nothing closed; `hold`: delivered late, in order, on the same connections (A's statements
    reach the server after the new owners' claims). A's health says within seconds that its
    database does not answer; nothing A wrote late overwrites the new owners' rows; once the
    link heals the table equals the reference and every worker is up and ready."""
    p = pipeline
    p.partitions = 8
    data, bad, thirds = await load(p, orders=40_000, in_parts=(4, 4), parts=3, skew="zipf")
    expected = reference.evaluate(data.orders, data.refunds)
    assert MYSQL_DIRECT in p.db_url, p.db_url
    a = p.start_worker(
        0,
        env={
            "COUPON_DB_URL": p.db_url.replace(MYSQL_DIRECT, MYSQL_PROXY),
            "COUPON_FLUSH_INTERVAL": "1",
        },
    )
    b = p.start_worker(1)
    await p.wait_ready(a)
    await p.wait_ready(b)
    await p.produce(thirds[0])
    await p.wait_quiescent()

    producing = asyncio.ensure_future(p.produce(thirds[1]))
    await until(lambda: _rows_in_flight(p, a, 500), 60, "A never had rows in flight", every=0.02)
    with mysql_proxy.cut() if fault == "cut" else mysql_proxy.hold():
        cut_at = time.monotonic()
        await producing
        slowest = 0.0

        async def says_database_down() -> bool:
            nonlocal slowest
            asked = time.monotonic()
            status, body = await asyncio.wait_for(p.http_get(a, "/health/ready"), 30)
            slowest = max(slowest, time.monotonic() - asked)
            return status == 503 and json.loads(body)["database"] is False

        down_s = await until(says_database_down, 20, "A's health saying the database is down")
        c = p.start_worker(2)  # a rebalance while A's write hangs
        await p.produce(thirds[2])
        # Past the driver's read timeout and the server's idle-transaction timeout.
        await asyncio.sleep(max(0.0, cut_at + 45 - time.monotonic()))
        p.assert_workers_alive()
        cut_s = round(time.monotonic() - cut_at, 1)
    await p.wait_quiescent(timeout=240)
    assert await p.table_rows() == expected
    await p.assert_grants_agree()
    await asyncio.sleep(10)  # anything A still had to write would land by now
    assert await p.table_rows() == expected
    p.assert_workers_alive()
    for worker in (a, b, c):
        await p.wait_ready(worker, timeout=60)
    assert slowest < 5, f"A's /health/ready took {slowest:.1f} s to answer"
    record(
        f"network partition ({fault}) of 1 of 3 workers from MariaDB while its partitions move",
        messages=len(data.orders) + len(data.refunds) + len(bad),
        cut_s=cut_s,
        health_said_down_s=round(down_s, 1),
        slowest_health_answer_s=round(slowest, 1),
        sink_retries=await p.metric(a, "coupon_sink_retries_total"),
        equal=True,
    )
    assert sorted(set(v for v, _ in await p.dead_letters())) == sorted(set(bad))
