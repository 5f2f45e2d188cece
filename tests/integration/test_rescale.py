"""`coupon-stream rescale`: capacity past the partition count, without replaying the input.

The new app's table must equal the seed SQL over everything produced, and its state (both
tables, read as of the committed offsets) must equal that of a fresh app with the new
partition count fed the same input from the start.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.takeover import synthesize_state
from coupon_stream.connectors import clients, deployment
from coupon_stream.connectors.kafka import PartitionReader
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.core.stored import META_KEYS, read_value
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools.dataset import Dataset, generate
from coupon_stream.tools.rescale import state_committed
from tests import reference
from tests.integration.harness import Pipeline, Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("coupon-stream"))


def rescale_cmd(p: Pipeline, partitions: int, to: str) -> list[str]:
    return [CLI, "rescale", "--partitions", str(partitions), "--to-app-id", to]


async def rescale(p: Pipeline, partitions: int, to: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        rescale_cmd(p, partitions, to),
        env=p.env(0, 0),
        capture_output=True,
        text=True,
        timeout=600,
    )


async def rescale_stopped(
    p: Pipeline, partitions: int, to: str
) -> subprocess.CompletedProcess[str]:
    """The rescale once the stopped workers are out of their groups: a worker that could not
    leave (stopped mid-rebalance, or killed) stays a member for a session timeout."""
    for _ in range(30):
        done = await rescale(p, partitions, to)
        if "still have members" not in done.stderr:
            return done
        await asyncio.sleep(1)
    return done


def messages_of(p: Pipeline, data: Dataset) -> list[tuple[str, int | None, bytes]]:
    out: list[tuple[str, int | None, bytes]] = []
    out += [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    out += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    return out


def expected(p: Pipeline, messages: list[tuple[str, int | None, bytes]]) -> set[tuple[Any, ...]]:
    """The seed SQL over the messages produced (copies included: the SQL dedups them)."""
    orders = [orjson.loads(v) for t, _, v in messages if t == p.orders_topic]
    refunds = [orjson.loads(v) for t, _, v in messages if t == p.refunds_topic]
    return reference.evaluate(orders, refunds)


def run_app(p: Pipeline, app: str, partitions: int, workers: int, first: int) -> list[Worker]:
    """Workers of `app` (fresh data dirs numbered from `first`), on the same input and table."""
    p.app_id, p.partitions = app, partitions
    return [p.start_worker(first + i) for i in range(workers)]


def stop(p: Pipeline, workers: list[Worker]) -> None:
    for w in workers:
        p.kill(w, signal.SIGTERM)


async def latest(reader: PartitionReader, topic: str, partition: int) -> dict[bytes, bytes]:
    """A changelog partition read to the end it has now: each key's last stored value."""
    end = (await reader.end_offsets(topic, [partition])).get(partition, 0)
    values: dict[bytes, bytes] = {}
    async for _, records, _ in reader.batches(topic, {partition: (0, end)}):
        for r in records:
            if r.value is None:
                values.pop(r.key, None)
            else:
                values[r.key] = r.value
    return values


async def read_state(settings: Settings) -> dict[str, dict[bytes, Any]]:
    """Both tables of an app, every partition, as of the state group's committed offsets:
    what its workers would hold after a takeover (meta keys left out)."""
    committed = await state_committed(settings)
    reader = PartitionReader(settings)
    try:
        tables: dict[str, dict[bytes, Any]] = {t: {} for t in STATE_TABLES}
        for table in STATE_TABLES:
            for p in range(settings.partitions):
                values = await latest(reader, settings.changelog_topics[table], p)
                for key, raw in values.items():
                    if key in META_KEYS:
                        continue
                    value = read_value(raw, committed.get(p, 0))
                    if value is not None:
                        tables[table][key] = value
        return tables
    finally:
        await reader.stop()


async def same_state_as_a_fresh_app(p: Pipeline, rescaled: str, partitions: int, dirs: int) -> None:
    """A new app id, `partitions` partitions, fed every input record from the start."""
    state = await read_state(p.settings)
    assert p.settings.app_id == rescaled
    fresh = run_app(p, f"{p.name}-fresh{partitions}", partitions, 1, dirs)
    await p.wait_quiescent()
    stop(p, fresh)
    expected = await read_state(p.settings)
    assert sum(len(t) for t in expected.values()) > 0
    for table in expected:
        assert state[table] == expected[table], table


async def test_rescale_4_to_12_then_12_to_3_equals_a_fresh_app_and_the_reference(pipeline):
    p = pipeline
    p.partitions = 4
    # With retention on, as in production: every partition keeps a day watermark, and the
    # rescale carries the newest one over (up and down).
    p.extra_env["COUPON_STATE_RETENTION_DAYS"] = "30"
    await p.create_topics(orders=4, refunds=2)
    data = generate(12_000, seed=41)
    messages = messages_of(p, data)
    random.Random(41).shuffle(messages)
    a, b, c = (messages[i::3] for i in range(3))

    old = run_app(p, f"{p.name}-p4", 4, 2, 0)
    await p.produce(a)
    await p.wait_quiescent()
    stop(p, old)

    done = await rescale_stopped(p, 12, f"{p.name}-p12")
    assert done.returncode == 0, done.stderr
    assert "moved " in done.stdout and f"COUPON_APP_ID={p.name}-p12" in done.stdout
    assert "COUPON_PARTITIONS=12" in done.stdout
    wide = run_app(p, f"{p.name}-p12", 12, 3, 10)
    await p.produce(b + a[: len(a) // 3])  # new input, and duplicates of part of the old
    await p.wait_quiescent()
    stop(p, wide)
    assert await p.table_rows() == expected(p, a + b)
    await p.assert_grants_agree([f"{p.name}-p4", f"{p.name}-p12"])
    await same_state_as_a_fresh_app(p, f"{p.name}-p12", 12, 20)

    p.app_id, p.partitions = f"{p.name}-p12", 12
    done = await rescale_stopped(p, 3, f"{p.name}-p3")
    assert done.returncode == 0, done.stderr
    narrow = run_app(p, f"{p.name}-p3", 3, 2, 30)
    await p.produce(c + b[: len(b) // 3])
    await p.wait_quiescent()
    stop(p, narrow)
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    await p.assert_grants_agree([f"{p.name}-p4", f"{p.name}-p12", f"{p.name}-p3"])
    await same_state_as_a_fresh_app(p, f"{p.name}-p3", 3, 40)


async def test_refused_while_live_lagging_or_into_an_app_with_state(pipeline):
    p = pipeline
    p.partitions = 2
    await p.create_topics(orders=2, refunds=1)
    data = generate(500, seed=42)
    workers = run_app(p, f"{p.name}-old", 2, 1, 0)
    await p.produce(messages_of(p, data))
    await p.wait_quiescent()

    live = await rescale(p, 4, f"{p.name}-new")
    assert live.returncode == 2 and "still have members" in live.stderr, live.stderr
    stop(p, workers)

    # A record forwarded to the by-buyer topic that no state stage applied.
    await p.produce([(p.by_buyer_topic, 0, b"forwarded, never applied")])
    lagging = await rescale(p, 4, f"{p.name}-new")
    assert lagging.returncode == 2, lagging.stderr
    assert "until `coupon-stream status` shows no lag" in lagging.stderr

    # An app id that holds state of its own: refused before any write.
    other = p.settings.model_copy(update={"app_id": f"{p.name}-other"})
    await deployment.create_internal_topics(other)
    producer = clients.producer(p.admin)
    await producer.start()
    try:  # a changelog is compacted: its records have keys
        topic = other.changelog_topics["days"]
        await producer.send_and_wait(topic, b"[0,0,[1,1,null,null],null]", key=b"k", partition=0)
    finally:
        await producer.stop()
    p.app_id = f"{p.name}-old-drained"  # an old app with no lag: a fresh one
    taken = await rescale(p, 4, f"{p.name}-other")
    assert taken.returncode == 2 and "already holds state" in taken.stderr, taken.stderr


async def test_a_rescale_killed_halfway_and_run_again_ends_as_one_uninterrupted(pipeline):
    p = pipeline
    p.partitions = 4
    p.app_id = f"{p.name}-old"
    await p.create_topics(orders=2, refunds=1)
    # A state large enough to kill the rescale in the middle of it.
    await synthesize_state(p.admin, 1_200_000, first_buyer=1_000_000)
    cmd = rescale_cmd(p, 8, f"{p.name}-resumed")
    proc = subprocess.Popen(
        cmd, env=p.env(0, 0), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    first = await asyncio.to_thread(proc.stdout.readline)  # one old partition moved
    assert first.startswith("old partition ") and "(1/4 done" in first, first
    os.killpg(proc.pid, signal.SIGKILL)  # the rescale and its processes
    proc.wait()
    again = await rescale(p, 8, f"{p.name}-resumed")
    assert again.returncode == 0, again.stderr
    moved_before = first.split(":")[0] + ":"
    assert moved_before not in again.stdout  # done before the kill: not moved again
    assert "(4/4 done" in again.stdout
    whole = await rescale(p, 8, f"{p.name}-whole")
    assert whole.returncode == 0, whole.stderr
    p.app_id, p.partitions = f"{p.name}-resumed", 8
    resumed = await read_state(p.settings)
    p.app_id = f"{p.name}-whole"
    assert resumed == await read_state(p.settings)
    assert len(resumed["entries"]) == 1_200_000
    # The same command once more: nothing to do, the same end state.
    p.app_id, p.partitions = f"{p.name}-old", 4
    once_more = await rescale(p, 8, f"{p.name}-resumed")
    assert once_more.returncode == 0 and "already rescaled" in once_more.stdout


async def test_a_checkpoint_cut_short_before_the_stop_counts_as_in_a_takeover(pipeline):
    p = pipeline
    p.partitions = 4
    await p.create_topics(orders=2, refunds=2)
    data = generate(8_000, seed=43)
    messages = messages_of(p, data)
    random.Random(43).shuffle(messages)
    half = len(messages) // 2
    p.app_id = f"{p.name}-old"
    first = p.start_worker(0)
    await p.produce(messages[:half])
    await p.wait_quiescent()
    p.kill(first, signal.SIGTERM)
    p.extra_env["COUPON_CRASH_POINT"] = "changelog-entries"  # killed inside a checkpoint
    crashing = p.start_worker(0)
    await p.produce(messages[half:])
    assert await asyncio.to_thread(crashing.proc.wait, 120) == -signal.SIGKILL
    del p.extra_env["COUPON_CRASH_POINT"]
    refused = await rescale_stopped(p, 6, f"{p.name}-new")  # then its lag shows
    assert refused.returncode == 2 and "no lag" in refused.stderr, refused.stderr
    again = p.start_worker(0)  # until status shows no lag, then stopped
    await p.wait_quiescent()
    p.kill(again, signal.SIGTERM)
    done = await rescale_stopped(p, 6, f"{p.name}-new")
    assert done.returncode == 0, done.stderr
    new = run_app(p, f"{p.name}-new", 6, 2, 10)
    await p.produce(messages[: half // 2])  # duplicates only: nothing may change
    await p.wait_quiescent()
    stop(p, new)
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)


class _Interrupted(Exception):
    """The rescale stopped after its first partition, as a kill would stop it."""


async def test_a_resumed_rescale_refuses_partitions_the_old_app_changed_since(pipeline):
    """Interrupted rescale, old workers restarted to end the downtime, stopped again, the
    same command again: the partition moved before no longer holds the old app's state, so
    the rescale is refused, saying which; another target app id then rescales it whole."""
    from coupon_stream.tools.rescale import RescaleUnsafe
    from coupon_stream.tools.rescale import rescale as rescale_now

    p = pipeline
    p.partitions = 4
    p.extra_env["COUPON_STATE_RETENTION_DAYS"] = "30"
    await p.create_topics(orders=2, refunds=2)
    data = generate(6_000, seed=47)
    messages = messages_of(p, data)
    random.Random(47).shuffle(messages)
    half = len(messages) // 2
    old_app = f"{p.name}-old"
    workers = run_app(p, old_app, 4, 1, 0)
    await p.produce(messages[:half])
    await p.wait_quiescent()
    stop(p, workers)

    def after_one(line: str) -> None:
        if line.startswith("old partition ") and "(1/4 done" in line:
            raise _Interrupted(line)

    old = p.settings
    with pytest.raises(_Interrupted):
        for _ in range(30):  # the stopped worker leaves its groups within a session timeout
            try:
                await rescale_now(old, 8, f"{p.name}-new", say=after_one)
            except RescaleUnsafe as refused:
                assert "still have members" in str(refused), refused
                await asyncio.sleep(1)

    workers = run_app(p, old_app, 4, 1, 0)  # the downtime ended: the old app runs again
    await p.produce(messages[half:])
    await p.wait_quiescent()
    stop(p, workers)
    again = await rescale_stopped(p, 8, f"{p.name}-new")
    assert again.returncode == 2, again.stderr
    assert "moved since they were copied" in again.stderr and "another --to-app-id" in again.stderr

    fresh = await rescale_stopped(p, 8, f"{p.name}-other")
    assert fresh.returncode == 0, fresh.stderr
    new = run_app(p, f"{p.name}-other", 8, 2, 10)
    await p.produce(messages[: half // 2])  # duplicates only: nothing may change
    await p.wait_quiescent()
    stop(p, new)
    assert await p.table_rows() == reference.evaluate(data.orders, data.refunds)
