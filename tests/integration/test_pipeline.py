"""End to end: real workers, real Kafka, real MariaDB, compared with the seed SQL in SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
from typing import Any

import orjson
import pytest

from coupon_stream.tools.dataset import generate
from tests import reference
from tests.integration.harness import SESSION_TIMEOUT, Worker, record, until
from tests.integration.toxiproxy import PROXIED_BOOTSTRAP

pytestmark = pytest.mark.integration

BAD_ORDERS = [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"biz_order_id": "bad-1", "pay_status": "2", "pay_time": "2026-11-11 10:00:00",'
    b' "div_idx_actual_total_fee": 100}',
    b'{"biz_order_id": "bad-2", "pay_status": "2", "buyer_id": "12x", '
    b'"pay_time": "2026-11-11 10:00:00", "div_idx_actual_total_fee": 100}',
    b'{"biz_order_id": "bad-3", "pay_status": "2", "buyer_id": "5", '
    b'"pay_time": "2026-02-30 10:00:00", "div_idx_actual_total_fee": 100}',
    b'{"biz_order_id": "bad-4", "pay_status": "2", "buyer_id": "5", '
    b'"pay_time": "2026-11-11 10:00:00", "div_idx_actual_total_fee": "100"}',
]
BAD_REFUNDS = [
    b'{"biz_order_id": "bad-5", "pay_status": "4", "buyer_id": "5", '
    b'"pay_time": "2026-11-11 10:00:00", "div_idx_actual_total_fee": -100}',
    b'{"biz_order_id": "bad-6", "pay_status": "4", "buyer_id": "99999999999999999999", '
    b'"pay_time": "2026-11-11 10:00:00", "refund_fee": -100}',
]


def rec(order: str, buyer: str, fee: float, gm: str, status: str = "2", **extra) -> dict[str, Any]:
    field = "div_idx_actual_total_fee" if status == "2" else "refund_fee"
    return {
        "biz_order_id": order,
        "pay_status": status,
        "buyer_id": buyer,
        "pay_time": "2026-11-12 08:00:00",
        "gmt_create": "2026-11-12 07:59:00",
        "gmt_modified": gm,
        "auction_title": 'x,"y"\tz\n双',
        field: fee,
        **extra,
    }


async def test_end_to_end_equals_reference_sql_through_deletes_and_returns(pipeline):
    p = pipeline
    await p.create_topics(orders=3, refunds=2)
    p.start_worker()
    rng = random.Random(11)
    data = generate(3000, seed=5)
    orders, refunds = list(data.orders), []

    # Copies of one record on different partitions, the later-generated copy first.
    late = rec("dup-1", "777", 12399, "2026-11-12 09:00:00")
    early = rec("dup-1", "777", 12399, "2026-11-12 08:00:01")
    phase1: list[tuple[str, int | None, bytes]] = [(p.orders_topic, 0, orjson.dumps(late))]
    phase1 += [(p.orders_topic, None, orjson.dumps(o)) for o in orders]
    phase1 += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    phase1 += [(p.orders_topic, 2, orjson.dumps(early))]
    bad = [(p.orders_topic, None, b) for b in BAD_ORDERS]
    bad += [(p.refunds_topic, None, b) for b in BAD_REFUNDS]
    for item in bad:
        phase1.insert(rng.randrange(len(phase1)), item)
    orders += [late, early]
    refunds += data.refunds
    await p.produce(phase1)
    await p.wait_quiescent()
    expected = reference.evaluate(orders, refunds)
    assert (None, None, 777, 123, 20261112) not in expected
    assert ("2026-11-12 07:59:00", "2026-11-12 08:00:01", 777, 123, 20261112) in expected
    assert await p.table_rows() == expected

    # Phase 2: refunds bring buyer 777 to exactly zero (truncated) -> the row is deleted.
    refund = rec("dup-1", "777", -12300.5, "2026-11-12 10:00:00", status="4")
    refunds.append(refund)
    await p.produce([(p.refunds_topic, 1, orjson.dumps(refund))])
    await p.wait_quiescent()
    expected = reference.evaluate(orders, refunds)
    assert not any(row[2] == 777 for row in expected)
    assert await p.table_rows() == expected

    # Phase 3: a new order brings it above zero again -> the row comes back.
    again = rec("dup-2", "777", 500, "2026-11-12 11:00:00")
    orders.append(again)
    await p.produce([(p.orders_topic, 1, orjson.dumps(again))])
    await p.wait_quiescent()
    expected = reference.evaluate(orders, refunds)
    assert ("2026-11-12 07:59:00", "2026-11-12 11:00:00", 777, 5, 20261112) in expected
    assert await p.table_rows() == expected

    # Every bad message is on the dead-letter topic with its bytes, origin and a reason.
    letters = await p.dead_letters()
    assert sorted(v for v, _ in letters) == sorted(b for _, _, b in bad)
    for _, headers in letters:
        assert headers["coupon.source.topic"].decode() in (p.orders_topic, p.refunds_topic)
        assert int(headers["coupon.source.offset"]) >= 0
        assert headers["coupon.error.reason"]
    reasons = {v: h["coupon.error.reason"].decode() for v, h in letters}
    assert "refund_fee" in reasons[BAD_REFUNDS[0]]
    assert "64-bit" in reasons[BAD_REFUNDS[1]]

    # Messages in = records applied (new, replaced or duplicate) + dead letters.
    worker = p.workers[0]
    consumed = await p.metric(worker, "coupon_messages_consumed_total")
    applied = await p.metric(worker, "coupon_records_total")
    dead = await p.metric(worker, "coupon_dead_letters_total")
    produced = len(phase1) + 2
    assert consumed == produced
    assert applied + dead == produced
    assert dead == len(bad)


async def test_kill_9_mid_stream_neither_loses_nor_double_counts(pipeline):
    p = pipeline
    await p.create_topics(orders=4, refunds=3)
    data = generate(65_000, seed=21)  # about 100k messages
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    random.Random(3).shuffle(messages)
    rng = random.Random(5)
    worker = p.start_worker(0)
    progress = []
    # A third of the input before each kill: a worker drains 100k messages in seconds, so
    # each kill needs fresh work in flight to land mid-stream.
    for part in range(3):
        await p.produce(messages[part::3])
        progress.append(round(await p.wait_for_progress(), 1))
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        p.kill(worker)
        worker = p.start_worker(0)  # same data dir: resumes from local RocksDB
    await p.wait_quiescent()
    equal = await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    record(
        "crash: kill -9 x3, restart on same data dir",
        messages=len(messages),
        equal=equal,
        progress_after_start_s=progress,
    )
    assert equal
    await p.assert_grants_agree()


async def test_intake_processes_apart_feed_workers_without_one_through_a_kill_9(pipeline):
    """COUPON_INTAKE=false workers and `coupon-stream intake` processes: the workers join no
    intake group and read no source topic, the intakes share the source partitions, an
    intake killed mid-stream is replayed by the other, and the table equals the seed SQL."""
    p = pipeline
    await p.create_topics(orders=4, refunds=3)
    data = generate(30_000, seed=17)
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    bad = [(p.orders_topic, None, b) for b in BAD_ORDERS]
    bad += [(p.refunds_topic, None, b) for b in BAD_REFUNDS]
    messages += bad
    random.Random(9).shuffle(messages)
    workers = [p.start_worker(i, env={"COUPON_INTAKE": "false"}) for i in range(2)]
    intakes = [p.start_intake(i) for i in range(2)]
    # Both intakes hold source partitions before any input: else the first to join may read
    # the whole first half alone, and the one to kill has nothing in hand.
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        members = await p.group_members(f"{p.app}-intake")
        held = [sum(map(len, m.assignment.values())) for m in members]
        if len(held) == 2 and sum(held) == 7 and all(held):
            break
        assert asyncio.get_running_loop().time() < deadline, members
        await asyncio.sleep(0.5)
    await p.produce(messages[: len(messages) // 2])
    while True:
        with contextlib.suppress(OSError):  # its web port is not up yet
            if await p.metric(intakes[0], "coupon_messages_consumed_total") > 0:
                break
        assert asyncio.get_running_loop().time() < deadline, intakes[0].tail()
        await asyncio.sleep(0.2)
    p.kill(intakes[0])  # mid-stream: its uncommitted batches go to the other
    await p.produce(messages[len(messages) // 2 :])
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    # A replayed batch may send its dead letters again: each bad message, with its reason.
    letters = await p.dead_letters()
    assert {v for v, _ in letters} == {b for _, _, b in bad}
    assert all(h["coupon.error.reason"] for _, h in letters)

    survivor = intakes[1]
    status, body = await p.http_get(survivor, "/health/ready")
    assert status == 200, body
    assert orjson.loads(body)["source_partitions"] == 7  # the dead one's too, now
    assert await p.metric(survivor, "coupon_messages_consumed_total") > 0

    async def caught_up() -> bool:  # the lag is exported every 5 s
        return bool(await p.metric(survivor, "coupon_consumer_lag", topic=p.orders_topic) == 0)

    await until(caught_up, 30, survivor.tail, every=1)
    for worker in workers:
        assert await p.metric(worker, "coupon_messages_consumed_total") == 0
        assert await p.metric(worker, "coupon_records_total") > 0
    members = await p.group_members(f"{p.app}-intake")
    assert len(members) == 1, members  # the survivor: no worker joined
    assert not any(m.is_worker(w) for m in members for w in workers)


@pytest.mark.parametrize("kind", ["worker", "intake"])
async def test_a_process_started_while_kafka_does_not_answer_waits_for_it(
    pipeline, kafka_proxy, kind
):
    """A worker or an intake process that cannot reach the brokers at start waits, retrying,
    until it has created the internal topics, and then works: started anyway, a worker
    stopped when Faust's producer could not bootstrap, and an intake process's first send
    could have the broker create the by-buyer topic with its default partition count."""
    p = pipeline
    await p.create_topics(orders=2, refunds=2)
    data = generate(3_000, seed=23)
    proxied = {"COUPON_BROKER": f"kafka://{PROXIED_BOOTSTRAP}"}
    with kafka_proxy.disabled():
        if kind == "worker":
            waiting = p.start_worker(0, env=proxied)
        else:
            waiting = p.start_intake(0, env=proxied)
        said = re.compile(rf"internal topics could not be checked .* the {kind} waits")
        deadline = asyncio.get_running_loop().time() + 120
        while not waiting.lines(said):
            assert waiting.proc.poll() is None, waiting.tail()
            assert asyncio.get_running_loop().time() < deadline, waiting.tail()
            await asyncio.sleep(0.5)
        await asyncio.sleep(5)  # retrying (the log folds the same line said again)
        assert waiting.proc.poll() is None, waiting.tail()
        assert await p.partition_count(p.by_buyer_topic) == 0
    worker = waiting if kind == "worker" else p.start_worker(0, env={"COUPON_INTAKE": "false"})
    await p.wait_ready(waiting)
    await p.produce(p.messages(data))
    await p.wait_quiescent()
    assert await p.partition_count(p.by_buyer_topic) == p.partitions
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    consumed = await p.metric(worker, "coupon_messages_consumed_total")
    assert consumed == (len(data.orders) + len(data.refunds) if kind == "worker" else 0)
    p.assert_workers_alive()


async def test_an_intake_process_cut_off_past_its_session_is_not_ready_and_then_carries_on(
    pipeline, kafka_proxy
):
    """Cut off from the brokers past its session timeout, an intake process has lost its
    source partitions to the group: /health/ready says so (503: not a member, or a batch
    failing or in flight past the session) until the link is back; then it joins again, and the
    table equals the seed SQL."""
    p = pipeline
    await p.create_topics(orders=2, refunds=2)
    data = generate(20_000, seed=29)
    messages = p.messages(data)
    worker = p.start_worker(0, env={"COUPON_INTAKE": "false"})
    intake = p.start_intake(0, env={"COUPON_BROKER": f"kafka://{PROXIED_BOOTSTRAP}"})
    await p.wait_ready(worker)
    await p.wait_ready(intake)
    status, body = await p.http_get(intake, "/health/ready")
    assert orjson.loads(body)["source_partitions"] == 4, body
    await p.produce(messages[: len(messages) // 2])
    with kafka_proxy.disabled():
        await p.produce(messages[len(messages) // 2 :])

        async def not_ready() -> bool:
            return bool((await p.http_get(intake, "/health/ready"))[0] != 200)

        await until(not_ready, SESSION_TIMEOUT + 30, intake.tail, every=0.5)
        status, body = await p.http_get(intake, "/health/ready")
        assert status == 503, body
        # Revoked; or, if the cut caught it with a batch in hand, a batch failing, or being
        # forwarded or committed past the session (nothing polls the consumer meanwhile).
        said = orjson.loads(body)
        sending = said["forward_error"] or (said["batch_s"] or 0) > SESSION_TIMEOUT
        assert said["member"] is False or sending, body
        assert intake.proc.poll() is None, intake.tail()
    await p.wait_ready(intake)
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    assert intake.proc.poll() is None, intake.tail()


async def test_an_intake_process_frozen_past_its_session_rejoins_and_counts_nothing_twice(
    pipeline,
):
    """An intake process SIGSTOPped mid-stream past its session timeout (a throttled
    container, a VM migration): the other takes all source partitions; thawed, whatever
    batch it had in hand goes out again and its commit is refused, both harmless; it joins
    again, and the table equals the seed SQL."""
    p = pipeline
    await p.create_topics(orders=2, refunds=2)
    data = generate(20_000, seed=31)
    messages = p.messages(data)
    random.Random(3).shuffle(messages)
    p.start_worker(0, env={"COUPON_INTAKE": "false"})
    frozen, other = p.start_intake(0), p.start_intake(1)

    async def holds(intake: Worker) -> int:
        with contextlib.suppress(OSError):
            status, body = await p.http_get(intake, "/health/ready")
            if status == 200:
                return int(orjson.loads(body)["source_partitions"])
        return -1

    async def both_hold() -> bool:
        return await holds(frozen) > 0 and await holds(other) > 0

    async def consumed() -> bool:
        return bool(await p.metric(frozen, "coupon_messages_consumed_total") > 0)

    async def other_holds_all() -> bool:  # the group dropped the frozen one
        return await holds(other) == 4

    await until(both_hold, 120, frozen.tail, every=0.5)
    await p.produce(messages[: len(messages) // 2])
    await until(consumed, 60, frozen.tail, every=0.1)
    p.freeze(frozen)
    await p.produce(messages[len(messages) // 2 :])
    await until(other_holds_all, SESSION_TIMEOUT + 60, other.tail, every=0.5)
    p.thaw(frozen)
    await p.wait_quiescent()
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    await p.wait_ready(frozen)  # a member again
    assert frozen.proc.poll() is None and other.proc.poll() is None


async def test_restart_on_same_data_dir_resumes_from_local_rocksdb(pipeline):
    p = pipeline
    await p.create_topics(orders=2, refunds=2)
    data = generate(3000, seed=8)
    await p.produce(
        [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
        + [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    )
    first = p.start_worker(0)
    await p.wait_quiescent()
    p.kill(first, signal.SIGTERM)
    changelog = await p.changelog_size()
    assert changelog >= len({o["buyer_id"] for o in data.orders})  # every buyer at least once

    again = p.start_worker(0)  # same data dir
    await p.wait_ready(again)
    assert await p.metric(again, "coupon_state_restored_records_total") == 0
    p.kill(again, signal.SIGTERM)

    fresh = p.start_worker(1)  # empty data dir: the whole changelog is read
    await p.wait_ready(fresh)
    assert await p.metric(fresh, "coupon_state_restored_records_total") == changelog
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    await p.assert_grants_agree()


async def test_empty_data_dir_restores_in_bulk_and_a_replay_counts_nothing_twice(pipeline):
    p = pipeline
    p.partitions = 2  # two large partitions, each far past the bulk restore threshold
    await p.create_topics(orders=2, refunds=2)
    data = generate(10_000, seed=9)
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    await p.produce(messages)
    first = p.start_worker(0)
    await p.wait_quiescent()
    p.kill(first, signal.SIGTERM)
    changelog = await p.changelog_size()

    fresh = p.start_worker(1)  # empty data dir
    ready_s = await p.wait_ready(fresh)
    restored = await p.metric(fresh, "coupon_state_restored_records_total")
    bulk = await p.metric(fresh, "coupon_state_bulk_restored_records_total")
    assert restored == bulk == changelog

    # Every record again: with the state restored right, each is a duplicate.
    await p.produce(messages)
    await p.wait_quiescent()
    duplicates = await p.metric(fresh, "coupon_records_total", outcome="duplicate")
    equal = await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    record(
        "restore: empty data dir, bulk, then a full replay",
        changelog_records=changelog,
        bulk_restored=bulk,
        ready_s=round(ready_s, 1),
        replayed=len(messages),
        duplicates=duplicates,
        equal=equal,
    )
    assert duplicates == len(messages)
    assert equal


async def test_hot_buyer_with_30_percent_of_100k_orders_equals_reference_sql(pipeline):
    """One buyer with 30% of the orders over the three days, among ordinary buyers.

    That buyer's kept records are far more than fit in one Kafka message (1 MiB): the state
    must hold them some other way and still count every order once.
    """
    p = pipeline
    await p.create_topics(orders=3, refunds=2)
    data = generate(100_000, seed=13, skew="hot", hot_share=0.3)
    hot = str(10_000_000 + 100_000 // 4)
    hot_orders = len({o["biz_order_id"] for o in data.orders if o["buyer_id"] == hot})
    assert 28_000 < hot_orders < 32_000
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    random.Random(17).shuffle(messages)
    p.start_worker(0)
    await p.produce(messages)
    await p.wait_quiescent(timeout=300)
    expected = reference.evaluate(data.orders, data.refunds)
    assert {row[4] for row in expected if row[2] == int(hot)} == {20261111, 20261112, 20261113}
    rows = await p.table_rows()
    assert {r for r in rows if r[2] == int(hot)} == {r for r in expected if r[2] == int(hot)}
    assert rows == expected
    assert await p.dead_letters() == []
    worker = p.workers[0]
    assert await p.metric(worker, "coupon_messages_consumed_total") == len(messages)
    assert await p.metric(worker, "coupon_dead_letters_total") == 0
