"""A worker that lost its disk restores a large state in bulk, off the rebalance path.

The state is a real one (the input processed by a first worker) plus 3M changelog records of
other buyers written straight into the changelogs, as `bench/takeover.py` does: more than
Faust's record-at-a-time recovery reads in minutes. The first worker dies by `kill -9` and
its data dir is deleted, as on a new machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import signal
import time
from typing import Any

import orjson
import pytest

from bench.takeover import synthesize_state
from coupon_stream.tools.dataset import Dataset, generate
from tests import reference
from tests.integration.harness import SESSION_TIMEOUT, Pipeline, Worker, record, until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 2.4M entries of 600k buyers (4 each, one day each): 3M changelog records.
PADDING_ENTRIES = 2_400_000
PADDING_BUYERS_FROM = 5_000_000_000  # far from the generated buyers (10M and up)
# Generous: the bench measures the rate. Faust's recovery alone (~6k records/s here) would
# need over eight minutes for this state.
SLOWEST_RESTORE = 20_000  # records/s
# What a worker's log shows for a missed heartbeat or a failed commit (aiokafka, Faust, ours).
TROUBLE = re.compile(
    r"Heartbeat session expired|member_id was not recognized|generation id is not +current"
    r"|OffsetCommit failed|offset commit failed|Committing raised exception"
)


async def processed_then_padded(
    p: Pipeline, seed: int
) -> tuple[Dataset, list[tuple[str, int | None, bytes]], Worker, int]:
    """Input processed by worker 0, 3M records of other buyers added to the changelogs."""
    await p.create_topics(orders=4, refunds=2)
    data = generate(10_000, seed=seed)
    messages: list[tuple[str, int | None, bytes]]
    messages = [(p.orders_topic, None, orjson.dumps(o)) for o in data.orders]
    messages += [(p.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]
    random.Random(seed).shuffle(messages)
    first = p.start_worker(0)
    await p.produce(messages)
    await p.wait_quiescent()
    await synthesize_state(p.admin, PADDING_ENTRIES, first_buyer=PADDING_BUYERS_FROM, meta=False)
    changelog = await p.changelog_size()
    assert changelog >= 3_000_000
    return data, messages, first, changelog


def lose_the_disk(p: Pipeline, worker: Worker, index: int) -> None:
    p.kill(worker, signal.SIGKILL)
    shutil.rmtree(p.tmp / f"worker{index}")


async def readiness(p: Pipeline, worker: Worker) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads((await p.http_get(worker, "/health/ready"))[1])
        return status
    except (OSError, ValueError):
        return {}


async def wait_restoring(p: Pipeline, worker: Worker) -> None:
    """Until the worker's readiness names partitions it is restoring."""

    async def restoring() -> bool:
        p.assert_workers_alive()
        return bool((await readiness(p, worker)).get("restoring"))

    await until(restoring, 120, worker.tail, every=0.2)


def trouble(worker: Worker) -> list[str]:
    return [
        line for line in worker.log.read_text(errors="replace").splitlines() if TROUBLE.search(line)
    ]


async def test_kill_9_with_the_data_dir_gone_restores_in_bulk_then_replays_count_nothing(
    pipeline,
):
    p = pipeline
    p.partitions = 4
    data, messages, first, changelog = await processed_then_padded(p, seed=31)
    lose_the_disk(p, first, 0)

    # SIGTERM in the middle of a restore ends the worker well within a container's grace.
    stopped = p.start_worker(5)
    await wait_restoring(p, stopped)
    began = time.monotonic()
    p.kill(stopped, signal.SIGTERM)
    stop_s = time.monotonic() - began
    assert stop_s < 30, (stop_s, stopped.proc.returncode, stopped.tail())

    fresh = p.start_worker(0)  # the same data dir, now empty
    began = time.monotonic()
    seen_restoring: dict[str, Any] = {}
    while (status := await readiness(p, fresh)).get("ready") is not True:
        p.assert_workers_alive()
        if status.get("restoring") and not seen_restoring:
            seen_restoring = status
        assert time.monotonic() - began < 600, fresh.tail()
        await asyncio.sleep(0.5)
    ready_s = time.monotonic() - began
    restored = await p.metric(fresh, "coupon_state_restored_records_total")
    bulk = await p.metric(fresh, "coupon_state_bulk_restored_records_total")
    assert restored == bulk  # all in bulk: Faust's recovery had nothing left to read
    # every record the log still holds (the cleaner may have compacted superseded ones)
    assert 0.9 * changelog <= bulk <= changelog
    assert ready_s < SESSION_TIMEOUT + changelog / SLOWEST_RESTORE, ready_s
    # While it restored, readiness named the partitions with records left and an estimate.
    assert seen_restoring, "never saw the restore in /health/ready"
    part = seen_restoring["restoring"][0]
    assert {"table", "partition", "records_left", "eta_seconds"} <= set(part)
    assert part["records_left"] > 0
    assert "restored " in fresh.log.read_text() and not trouble(fresh)

    replay = messages[: len(messages) // 2]  # duplicates: with the state right, each is one
    await p.produce(replay)
    await p.wait_quiescent()
    duplicates = await p.metric(fresh, "coupon_records_total", outcome="duplicate")
    equal = await p.table_rows() == reference.evaluate(data.orders, data.refunds)
    record(
        "restore: kill -9, data dir gone, 3M+ changelog records",
        changelog_records=changelog,
        ready_s=round(ready_s, 1),
        records_per_s=round(changelog / ready_s),
        sigterm_mid_restore_exit_s=round(stop_s, 1),
        duplicates=duplicates,
        equal=equal,
    )
    assert duplicates == len(replay)
    assert equal
    await p.assert_grants_agree()


async def test_a_worker_joining_while_another_restores(pipeline):
    p = pipeline
    p.partitions = 4
    data, messages, first, changelog = await processed_then_padded(p, seed=32)
    lose_the_disk(p, first, 0)

    restoring = p.start_worker(0)
    began = time.monotonic()
    await wait_restoring(p, restoring)
    joining = p.start_worker(1)  # an empty data dir too: the group rebalances mid-restore
    for worker in (restoring, joining):
        await p.wait_ready(worker, timeout=600)
    # Nothing lost, nothing counted twice: replayed input changes nothing, new input counts.
    more = generate(2_000, seed=33)
    extra = [(p.orders_topic, None, orjson.dumps(o)) for o in more.orders]
    extra += [(p.refunds_topic, None, orjson.dumps(r)) for r in more.refunds]
    await p.produce(messages[::3] + extra)
    await p.wait_quiescent()
    expected = reference.evaluate(data.orders + more.orders, data.refunds + more.refunds)
    assert await p.table_rows() == expected
    await p.assert_grants_agree()
    # Between them, the two restored the whole state (some of it twice, around the
    # rebalance) and neither missed a heartbeat or failed a commit.
    restored = [
        await p.metric(w, "coupon_state_bulk_restored_records_total") for w in (restoring, joining)
    ]
    assert sum(restored) >= changelog and all(restored)
    assert trouble(restoring) == [] and trouble(joining) == []
    record(
        "restore: a second worker joins during the restore",
        changelog_records=changelog,
        restored_by_each=[int(r) for r in restored],
        both_ready_s=round(time.monotonic() - began, 1),
    )
