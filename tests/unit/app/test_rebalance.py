"""The restore in the background: what Faust's recovery waits for, cancelled by rebalances,
and the standby mirror after it (the wait itself, on Faust's objects: test_engine.py)."""

from __future__ import annotations

import asyncio

from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from coupon_stream.app import rebalance
from coupon_stream.app.rebalance import Restorer
from coupon_stream.connectors.engine import TP
from coupon_stream.connectors.store import MemoryStore
from tests.unit.fakes import Changelog, Changelogs, log_of

ENTRIES, DAYS = "a-entries-changelog", "a-days-changelog"


def restorer(records: int = 7) -> tuple[Restorer, Changelogs, dict[str, MemoryStore]]:
    def log(prefix: bytes) -> Changelog:
        pairs = [(prefix + b"%d" % i, b"v") for i in range(records)]
        return Changelog({0: log_of(*pairs), 1: log_of(*pairs)})

    logs = {ENTRIES: log(b"e"), DAYS: log(b"d")}
    stores = {ENTRIES: MemoryStore(), DAYS: MemoryStore()}
    reader = Changelogs(logs)
    r = Restorer({ENTRIES: ("entries", stores[ENTRIES]), DAYS: ("days", stores[DAYS])}, reader)
    return r, reader, stores


async def test_the_actives_are_restored_then_the_standbys_mirrored(monkeypatch):
    monkeypatch.setattr(rebalance, "MIRROR_SECONDS", 0.01)
    r, reader, stores = restorer()
    restored = r.plan({TP(ENTRIES, 0), TP(DAYS, 0)}, {TP(ENTRIES, 1), TP(DAYS, 1)})
    await asyncio.wait_for(restored.wait(), 5)
    assert stores[ENTRIES].persisted_offset(0) == 6 and stores[DAYS].persisted_offset(0) == 6
    assert r.progress.applied == 14 and r.progress.restoring() == []
    while len(r.standby_lag) < 2:
        await asyncio.sleep(0.01)
    assert r.standby_lag == {TP(ENTRIES, 1): 0, TP(DAYS, 1): 0}
    reader.logs[ENTRIES].logs[1].append(log_of(*[(b"x", b"y")] * 8)[7])  # the active writes
    while stores[ENTRIES].persisted_offset(1) != 7:
        await asyncio.sleep(0.01)
    assert dict(stores[ENTRIES].items(1))[b"x"] == b"y"
    await r.cancel()
    assert r.task is None
    # The revocation cleared the lag gauge; the copies it held may be another worker's now,
    # and the gauge's next export must not bring them back.
    assert r.standby_lag == {}


async def test_a_rebalance_cancels_the_restore_and_the_next_one_goes_on_from_its_offsets():
    r, reader, stores = restorer(records=10)
    reader.logs[ENTRIES].hold_after = 1  # one batch of 3, then stuck until cancelled
    first = r.plan({TP(ENTRIES, 0)}, set())
    while stores[ENTRIES].persisted_offset(0) is None:
        await asyncio.sleep(0)
    await r.cancel()  # the revocation
    assert first.is_set()  # the old recovery cycle is not left waiting
    assert stores[ENTRIES].persisted_offset(0) == 2
    reader.logs[ENTRIES].hold_after = None
    second = r.plan({TP(ENTRIES, 0)}, set())
    await asyncio.wait_for(second.wait(), 5)
    assert reader.logs[ENTRIES].asked == {0: (3, 10)}
    assert stores[ENTRIES].persisted_offset(0) == 9


async def test_a_plan_made_while_one_runs_waits_for_it_to_stop_first():
    r, reader, stores = restorer(records=10)
    reader.logs[ENTRIES].hold_after = 1
    r.plan({TP(ENTRIES, 0)}, set())
    while stores[ENTRIES].persisted_offset(0) is None:
        await asyncio.sleep(0)
    reader.logs[ENTRIES].hold_after = None
    second = r.plan({TP(ENTRIES, 0)}, set())  # no revocation in between
    await asyncio.wait_for(second.wait(), 5)
    assert stores[ENTRIES].persisted_offset(0) == 9


async def test_kafka_failing_hands_the_rest_to_faust_s_recovery(caplog):
    r, reader, stores = restorer()
    reader.fail = KafkaConnectionError()
    restored = r.plan({TP(ENTRIES, 0)}, set())
    await asyncio.wait_for(restored.wait(), 5)
    assert "bulk restore stopped, Faust's recovery reads the rest" in caplog.text
    assert stores[ENTRIES].persisted_offset(0) is None


async def test_a_shutdown_during_the_restore_ends_it_without_a_crash(caplog):
    """SIGTERM while a restore reads: the worker stops the reader under it."""
    r, reader, _ = restorer()
    reader.fail = ConsumerStoppedError()
    with caplog.at_level("INFO", logger="coupon_stream.app.rebalance"):
        restored = r.plan({TP(ENTRIES, 0)}, {TP(ENTRIES, 1)})
        await asyncio.wait_for(restored.wait(), 5)
        assert r.task is not None
        await asyncio.wait_for(r.task, 5)  # no mirror after it: the task ended
    assert "restore stopped: the worker is shutting down" in caplog.text


async def test_the_mirror_waits_out_an_outage_and_stops_for_a_refusal(monkeypatch, caplog):
    monkeypatch.setattr(rebalance, "MIRROR_SECONDS", 0.01)
    r, reader, stores = restorer()
    reader.fail = KafkaConnectionError()
    r.plan(set(), {TP(ENTRIES, 1)})
    while "standby mirror could not read" not in caplog.text:
        await asyncio.sleep(0.01)
    reader.fail = None  # Kafka is back
    while stores[ENTRIES].persisted_offset(1) != 6:
        await asyncio.sleep(0.01)
    reader.fail = TopicAuthorizationFailedError()  # an ACL took the read away: for good
    assert r.task is not None
    await asyncio.wait_for(r.task, 5)
    assert "standby mirror stopped" in caplog.text
