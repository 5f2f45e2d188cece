"""Faults injected while the service is busy; the table must still equal the seed SQL.

Each test loads about 100k messages (re-sent copies, refunds, totals crossing zero, bad
records), injects its fault mid-stream, lets the service finish and compares.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coupon_stream.core.state import STATE_TABLES
from coupon_stream.tools.dataset import generate
from tests import reference
from tests.integration.harness import SESSION_TIMEOUT, record, service
from tests.integration.test_pipeline import BAD_ORDERS, BAD_REFUNDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def load(p, orders=65_000, seed=1, in_parts=(3, 2), parts=1, skew="uniform"):
    """Create topics and make the input; produce it now, or return `parts` slices to send."""
    await p.create_topics(*in_parts)
    data = generate(orders, seed=seed, skew=skew)
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    bad = [(p.orders_topic, None, b) for b in BAD_ORDERS]
    bad += [(p.refunds_topic, None, b) for b in BAD_REFUNDS]
    rng = random.Random(seed)
    rng.shuffle(messages)
    for item in bad:
        messages.insert(rng.randrange(len(messages)), item)
    if parts == 1:
        await p.produce(messages)
        return data, sorted(b for _, _, b in bad)
    return data, sorted(b for _, _, b in bad), [messages[i::parts] for i in range(parts)]


async def check(p, data, bad, test, **measured):
    began = time.monotonic()
    await p.wait_quiescent(timeout=420)
    equal = await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    record(
        test,
        messages=len(data.orders) + len(data.refunds) + len(bad),
        equal=equal,
        drain_after_fault_s=round(time.monotonic() - began, 1),
        **measured,
    )
    assert equal
    # at-least-once may dead-letter a replayed bad message twice; each must be there
    await p.assert_grants_agree()
    assert sorted(set(v for v, _ in await p.dead_letters())) == sorted(set(bad))


async def test_rebalance_add_and_remove_workers_mid_stream(pipeline):
    p = pipeline
    p.partitions = 6
    # A worker drains a slice in seconds: each membership change gets fresh work in flight.
    data, bad, slices = await load(p, in_parts=(6, 6), parts=4)
    workers = [p.start_worker(i) for i in range(3)]
    await p.produce(slices[0])
    await p.wait_for_progress()
    p.start_worker(3)  # join
    await p.produce(slices[1])
    await asyncio.sleep(4)
    p.kill(workers[0], signal.SIGTERM)  # graceful leave
    await p.produce(slices[2])
    await asyncio.sleep(2)
    p.kill(workers[1])  # crash
    await p.produce(slices[3])
    resumed = await p.wait_for_progress()
    await check(
        p,
        data,
        bad,
        "rebalance: 3 workers, +1, -1 SIGTERM, -1 kill -9",
        resumed_after_kill_s=round(resumed, 1),
    )


async def standby_lags(p, worker) -> dict[str, float]:
    """This worker's `coupon_consumer_lag` samples of changelog partitions (standby copies)."""
    _, body = await p.http_get(worker, "/metrics")
    changelogs = [f'topic="{t}"' for t in p.settings.changelog_topics.values()]
    return {
        sample: float(value)
        for sample, value in (line.rsplit(" ", 1) for line in body.decode().splitlines())
        if sample.startswith("coupon_consumer_lag{") and any(c in sample for c in changelogs)
    }


async def test_kill_9_with_standby_replicas(pipeline):
    p = pipeline
    p.partitions = 4
    p.extra_env["COUPON_STANDBY_REPLICAS"] = "1"
    data, bad, slices = await load(p, in_parts=(4, 4), parts=2)
    workers = [p.start_worker(i) for i in range(2)]
    await p.produce(slices[0])
    await p.wait_quiescent(timeout=420)
    # Each partition of each table has one standby copy, on the worker that does not own
    # it; the lag gauge shows each copy catching up to its changelog's end.
    began = time.monotonic()
    while True:
        lags = [await standby_lags(p, w) for w in workers]
        if sum(len(w) for w in lags) == p.partitions * len(STATE_TABLES) and not any(
            v for w in lags for v in w.values()
        ):
            break
        assert time.monotonic() - began < 120, f"standbys never current: {lags}"
        await asyncio.sleep(1)
    standby_current_s = round(time.monotonic() - began, 1)
    # Killed while the second slice is still being sent: a worker drains a slice faster
    # than the test sends it, so the kill must not wait for the sending to end.
    producing = asyncio.ensure_future(p.produce(slices[1]))
    try:
        while not sum((await p.lag()).values()) and not producing.done():
            await asyncio.sleep(0.1)
        await p.wait_for_progress()
        p.kill(workers[0])
        # The survivor holds a current copy of every partition: it processes all of them
        # again a session timeout after the kill (the group's notice), plus a few seconds.
        resumed = await p.wait_every_partition_moves()
    finally:
        await producing
    assert resumed < SESSION_TIMEOUT + 10, resumed
    await check(
        p,
        data,
        bad,
        "standby: 2 workers, 1 standby replica, kill -9 mid-stream",
        standby_current_after_drain_s=standby_current_s,
        resumed_after_kill_s=round(resumed, 1),
    )


async def test_database_outage_is_retried_and_reported(pipeline):
    p = pipeline
    data, bad = await load(p)
    worker = p.start_worker()
    await p.wait_for_progress()
    service("mariadb.sh", "stop")
    try:
        await asyncio.sleep(3)
        code, body = await p.http_get(worker, "/health/ready")
        assert code == 503, body
        assert orjson.loads(body)["database"] is False
        await asyncio.sleep(17)
        p.assert_workers_alive()
        assert (await p.http_get(worker, "/health/live"))[0] == 200
    finally:
        service("mariadb.sh", "start")
    resumed = await p.wait_for_progress()
    await check(
        p,
        data,
        bad,
        "database outage: MariaDB stopped 20 s",
        resumed_after_restart_s=round(resumed, 1),
    )
    assert await p.metric(worker, "coupon_sink_retries_total") > 0
    code, _ = await p.http_get(worker, "/health/ready")
    assert code == 200


async def test_a_worker_joins_while_the_database_is_down(pipeline):
    """The first worker's write is retrying when the group rebalances: it gives the write up
    (committing nothing) instead of holding the rebalance, and whoever owns each partition
    next replays and writes it."""
    p = pipeline
    data, bad, slices = await load(p, parts=2)
    first = p.start_worker(0)
    await p.produce(slices[0])
    await p.wait_quiescent(timeout=420)
    service("mariadb.sh", "stop")
    try:
        await p.produce(slices[1])  # work that cannot be written yet
        await asyncio.sleep(3)
        p.start_worker(1)
        began = time.monotonic()
        while not (abandoned := await p.metric(first, "coupon_sink_abandoned_rows_total")):
            assert time.monotonic() - began < 90, first.tail()
            await asyncio.sleep(0.5)
        given_up_s = time.monotonic() - began
        p.assert_workers_alive()
    finally:
        service("mariadb.sh", "start")
    await check(
        p,
        data,
        bad,
        "database down, then a worker joins: the retrying write is given up and replayed",
        abandoned_rows=abandoned,
        given_up_after_join_s=round(given_up_s, 1),
    )


async def test_broker_restart_mid_stream(pipeline):
    p = pipeline
    data, bad = await load(p)
    p.start_worker()
    await p.wait_for_progress()
    service("kafka.sh", "restart")
    resumed = await p.wait_for_progress()
    await check(p, data, bad, "broker restart", resumed_after_restart_s=round(resumed, 1))


valid_or_bad = st.one_of(
    st.binary(max_size=120),
    st.sampled_from([b"NaN", b"{}", b"null", b'{"buyer_id": []}', "\u00e9".encode("latin-1")]),
    st.builds(
        lambda field, value: (field, value),
        st.sampled_from(
            ["biz_order_id", "pay_status", "buyer_id", "pay_time", "div_idx_actual_total_fee"]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.floats(allow_nan=False),
            st.text(max_size=8),
            st.just("2026-02-30 10:00:00"),
            st.just("92233720368547758070"),
            st.lists(st.integers(), max_size=2),
        ),
    ),
)


def invalid_by_construction(field, value) -> bool:
    """Decided from the rules of docs/semantics.md, independently of the service's parser."""
    if value is None or isinstance(value, bool | list):
        return True
    if field in ("biz_order_id", "pay_status"):
        return not isinstance(value, str)
    if field == "buyer_id":
        return not (
            isinstance(value, str)
            and re.fullmatch(r"[+-]?\d+", value)
            and -(2**63) <= int(value) < 2**63
        )
    if field == "pay_time":
        return not isinstance(value, str) or len(value) != 19 or value.startswith("2026-02-30")
    # the amount: valid if a finite number whose value / 100 fits a BIGINT
    return not isinstance(value, float) or abs(value) >= 1e21


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_property_bad_input_never_stops_the_worker(pipeline, data):
    """Hypothesis draws a corpus of broken messages mixed into valid ones, in one run."""
    p = pipeline
    await p.create_topics(2, 2)
    valid = generate(65_000, seed=data.draw(st.integers(0, 1000), label="seed"))  # ~100k msgs
    template = valid.orders[0]
    bad: list[bytes] = []
    for item in data.draw(st.lists(valid_or_bad, min_size=150, max_size=150), label="bad"):
        if isinstance(item, tuple):
            field, value = item
            record = dict(template, biz_order_id=f"bad-{len(bad)}")
            record[field] = value
            raw = orjson.dumps(record)
            if not invalid_by_construction(field, value):
                continue
            bad.append(raw)
        else:
            bad.append(item)
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in valid.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in valid.refunds]
    rng = random.Random(0)
    for raw in bad:
        messages.insert(rng.randrange(len(messages)), (p.orders_topic, None, raw))
    worker = p.start_worker()
    await p.produce(messages)
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(valid.orders, valid.refunds)
    await p.assert_grants_agree()
    assert sorted(v for v, _ in await p.dead_letters()) == sorted(bad)
    consumed = await p.metric(worker, "coupon_messages_consumed_total")
    applied = await p.metric(worker, "coupon_records_total")
    dead = await p.metric(worker, "coupon_dead_letters_total")
    assert consumed == len(messages) == applied + dead


@pytest.mark.parametrize(
    ("point", "same_data_dir"),
    [("changelog-entries", False), ("changelog-entries", True), ("local", True), ("sink", False)],
)
async def test_sigkill_between_the_writes_of_one_checkpoint(pipeline, point, same_data_dir):
    """The worker kills itself (COUPON_CRASH_POINT) after one write of a checkpoint and
    before the next: e.g. the entries changelog has the checkpoint, the days changelog not.
    Whoever takes over (a restart on the same RocksDB, or a worker restoring from the
    changelogs) must neither lose nor double-count a record."""
    p = pipeline
    p.partitions = 4
    data, bad, slices = await load(p, orders=20_000, in_parts=(2, 2), parts=2)
    first = p.start_worker(0)
    await p.produce(slices[0])
    await p.wait_quiescent()
    p.kill(first, signal.SIGTERM)
    p.extra_env["COUPON_CRASH_POINT"] = point
    crashing = p.start_worker(0)
    await p.produce(slices[1])
    code = await asyncio.to_thread(crashing.proc.wait, 120)
    assert code == -signal.SIGKILL, crashing.tail()
    assert f"COUPON_CRASH_POINT={point} reached" in crashing.tail(200)
    del p.extra_env["COUPON_CRASH_POINT"]
    p.start_worker(0 if same_data_dir else 1)
    await check(p, data, bad, f"kill -9 at checkpoint point {point}", same_data_dir=same_data_dir)
