"""The boundary to Faust and aiokafka, on their real objects: a rename upstream fails here.

Each test names the private attribute or behaviour of Faust or aiokafka that
`coupon_stream.connectors.engine` relies on, and runs the engine's function against it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from faust.tables.manager import TableManager
from faust.tables.recovery import RebalanceAgain
from faust.utils import terminal

from coupon_stream.connectors import engine
from coupon_stream.connectors.engine import TP, LookupTunedOptions, RocksStore, Worker
from coupon_stream.core.stored import buyer_prefix, entry_key
from coupon_stream.foundation.settings import Settings


@pytest.fixture
def app(tmp_path):
    s = Settings(app_id="engine-test", data_dir=tmp_path, partitions=2)
    app = engine.build_app(s, store="rocksdb://")
    app.finalize()
    return app


def test_the_consumer_keeps_committed_offsets_and_unacked_messages(app):
    consumer = app.consumer  # Faust's aiokafka consumer, not started
    tp = TP("engine-test-payments-by-buyer", 1)
    assert engine.consumer_committed(app, tp) is None  # Consumer._committed_offset
    message = faust.types.Message(tp.topic, tp.partition, 7, 0.0, 0, {}, None, b"v", None)
    consumer.track_message(message)
    assert message in consumer._unacked_messages
    event = faust.Event(app, None, b"v", {}, message)
    assert engine.is_event(event) and not engine.is_event(object())
    engine.release(app, event)
    assert message not in consumer._unacked_messages


async def test_a_commit_goes_through_faust_s_commit_of_explicit_offsets(app):
    # Consumer._commit_offsets(offsets) commits only the assigned partitions; the engine asks
    # the assignment first, which a consumer that never started does not have.
    commit = type(app.consumer)._commit_offsets
    assert inspect.iscoroutinefunction(commit)
    assert list(inspect.signature(commit).parameters)[:2] == ["self", "offsets"]
    with pytest.raises(faust.exceptions.ConsumerNotStarted):
        await engine.commit(app, {TP("engine-test-payments-by-buyer", 0): 5})
    assert engine.highwater(app, TP("engine-test-payments-by-buyer", 0)) is None


def test_membership_and_recovery_before_any_rebalance(app):
    # Consumer._thread._consumer._coordinator: none before the consumer starts.
    assert engine.membership(app) == engine.Membership(False, -1, None)  # no group joined
    assert not engine.recovered(app)


async def test_faust_s_consumer_reads_committed_and_holds_an_empty_fetch_briefly(app):
    """AIOKafkaConsumerThread._create_worker_consumer, and the two attributes of aiokafka's
    consumer its Fetcher is built from at start."""
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    assert consumer._isolation_level == "read_committed"
    assert consumer._fetch_max_wait_ms == engine.FETCH_MAX_WAIT_MS
    await consumer.stop()
    start = inspect.getsource(AIOKafkaConsumer.start)
    assert "isolation_level=self._isolation_level" in start
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in start


async def test_the_table_manager_starts_without_faust_s_sleep(app, monkeypatch):
    """TableManager.on_start: a 1 s sleep, then ._update_channels() and .recovery.start()."""
    faust_s = inspect.getsource(TableManager.on_start)
    assert "self.sleep(1.0)" in faust_s
    assert "self._update_channels()" in faust_s and "self.recovery.start()" in faust_s
    steps = []

    async def update_channels() -> None:
        steps.append("channels")

    async def start_recovery() -> None:
        steps.append("recovery")

    monkeypatch.setattr(app.tables, "_update_channels", update_channels)
    monkeypatch.setattr(app.tables.recovery, "start", start_recovery)
    await asyncio.wait_for(app.tables.on_start(), 0.5)
    assert steps == ["channels", "recovery"]


async def test_faust_s_recovery_waits_for_the_bulk_restore_and_starts_where_it_left(app):
    """Recovery.on_rebalance, .active_tps/.standby_tps/.active_offsets, ._wait, and the
    table manager's .recovery built from the app's TableManager."""
    table = app.Table("entries", partitions=2, key_type=bytes, value_type=bytes)
    changelog = engine.changelog_topic(table)
    active, standby = TP(changelog, 0), TP(changelog, 1)
    app.assignor.assigned_actives = lambda: {active}
    app.assignor.assigned_standbys = lambda: {standby}
    recovery = app.tables.recovery
    assert isinstance(recovery, engine.BulkRecovery)
    planned = []
    done = asyncio.Event()

    def planner(actives, standbys):
        planned.append((actives, standbys))
        return done

    engine.on_restore(app, planner)
    gen = app.consumer_generation_id
    await recovery.on_rebalance({active, standby}, set(), {active, standby}, gen)
    assert planned == [({active}, {standby})]
    assert recovery.active_tps == {active}
    assert recovery.standby_tps == set() and standby not in recovery.standby_offsets
    assert recovery.signal_recovery_start.is_set()  # Faust's recovery loop is woken...
    recovery.signal_recovery_start.clear()  # (as the loop does when it starts a cycle)
    step = asyncio.ensure_future(recovery._wait(asyncio.sleep(0)))
    await asyncio.sleep(0.05)
    assert not step.done()  # ...and holds at its first step until the restore is done
    table.data.set_persisted_offset(active, 41)  # where the bulk restore left the copy
    done.set()
    await asyncio.wait_for(step, 5)
    assert recovery.active_offsets[active] == 41  # Faust reads only what is past it


class EndsLater:
    """A consumer whose changelog ends read `ends` in turn (the last one from then on)."""

    def __init__(self, tp: TP, *ends: int) -> None:
        self.tp, self.ends, self.calls = tp, list(ends), 0

    async def highwaters(self, *tps: TP) -> dict[TP, int]:
        self.calls += 1
        return {self.tp: self.ends.pop(0) if len(self.ends) > 1 else self.ends[0]}


async def test_recovery_looks_again_at_a_changelog_end_behind_the_local_copy(app, monkeypatch):
    """A commit's markers not yet on the partition: its last stable offset is still the
    transaction's first record, behind the offset the checkpoint persisted. Faust's check
    would stop the worker; the recovery looks again until the end has caught up."""
    table = app.Table("entries", partitions=1, key_type=bytes, value_type=bytes)
    tp = TP(engine.changelog_topic(table), 0)
    recovery = app.tables.recovery
    recovery.add_active(table, tp)
    table.data.set_persisted_offset(tp, 1417)
    monkeypatch.setattr(engine, "MARKER_POLL_S", 0.01)
    consumer = EndsLater(tp, 0, 0, 1418)  # LSO 0, then the markers land
    await recovery._build_highwaters(consumer, {tp}, recovery.active_highwaters, "active")
    assert consumer.calls == 3 and recovery.active_highwaters[tp] == 1417

    # Still ahead when the wait is over: left to Faust's check, which stops the worker.
    monkeypatch.setattr(engine, "MARKER_WAIT_S", 0.05)
    consumer = EndsLater(tp, 0)
    await recovery._build_highwaters(consumer, {tp}, recovery.active_highwaters, "active")
    assert consumer.calls > 1 and recovery.active_highwaters[tp] == -1


async def test_a_rebalance_interrupts_the_wait_for_the_bulk_restore(app):
    table = app.Table("days", partitions=2, key_type=bytes, value_type=bytes)
    app.assignor.assigned_actives = lambda: {TP(engine.changelog_topic(table), 0)}
    app.assignor.assigned_standbys = lambda: set()
    engine.on_restore(app, lambda actives, standbys: asyncio.Event())
    recovery = app.tables.recovery
    await recovery.on_rebalance(set(), set(), set(), app.consumer_generation_id)
    recovery.signal_recovery_start.clear()
    step = asyncio.ensure_future(recovery._wait(asyncio.sleep(0)))
    await asyncio.sleep(0.05)
    recovery.signal_recovery_start.set()  # the next rebalance
    with pytest.raises(RebalanceAgain):  # Faust's recovery loop starts its next cycle
        await asyncio.wait_for(step, 5)


def test_rocks_store_on_a_real_faust_table(app, tmp_path):
    s = Settings(app_id="engine-test", data_dir=tmp_path)
    table = app.Table(
        "entries", partitions=2, key_type=bytes, value_type=bytes, options=engine.rocksdb_options(s)
    )
    changelog = engine.changelog_topic(table)
    assert changelog == "engine-test-entries-changelog"
    store = RocksStore(table.data, changelog)
    assert not store.is_open(0)  # Store._dbs: nothing opened yet
    table.data._db_for_partition(0)  # what Faust does when the partition is assigned
    assert store.is_open(0)
    keys = {entry_key(b, f"o{i}", "2"): f"{b}-{i}".encode() for b in (-1, 5, 6) for i in range(3)}
    store.write(0, {**keys, b"~format": b"2"})
    store.write(0, {entry_key(6, "o0", "2"): None})  # a delete in a batch
    assert store.get_many(0, [entry_key(5, "o1", "2"), entry_key(6, "o0", "2")]) == [b"5-1", None]
    scanned = [v for _, v in store.items(0, buyer_prefix(5))]
    assert scanned == [b"5-0", b"5-1", b"5-2"]  # the buyer's entries, in key order, no more
    store.persist_offset(0, 41)  # Faust's own persisted offset, under its own key
    assert store.persisted_offset(0) == 41
    assert table.data.persisted_offset(TP(changelog, 0)) == 41
    everything = dict(store.items(0))
    assert table.data.offset_key not in everything  # Faust's own key is not state
    assert len(everything) == 8 + 1
    assert engine.key_counts(table)[0] >= 1
    store.persist_offset(1, 3)  # partition 1 not open here: skipped, not opened
    assert not store.is_open(1)


def test_state_tables_open_rocksdb_with_whole_key_filters(app, tmp_path):
    """The worker's tables keep Faust's sizes and add the filters for absent keys."""
    table = app.Table("days", options={"driver": "rocksdict", "write_buffer_size": 4 * 1024 * 1024})
    store = table.data
    assert isinstance(table, engine.StateTable)
    assert isinstance(store.rocksdb_options, LookupTunedOptions)  # Table._new_store
    db = store.rocksdb_options.open(tmp_path / "p0.db")
    db[b"k"] = b"v"
    assert db[b"k"] == b"v"
    db.close()
    written = "\n".join(p.read_text() for p in (tmp_path / "p0.db").glob("OPTIONS-*"))
    settings = {line.strip() for line in written.splitlines()}
    assert "write_buffer_size=4194304" in settings  # Faust's options carried over
    assert "memtable_whole_key_filtering=true" in settings
    assert "whole_key_filtering=true" in settings
    assert "memtable_prefix_bloom_size_ratio=0.100000" in settings


def test_worker_root_logger_takes_the_log_level_and_gets_no_spinner():
    # Faust's own worker would add a spinner handler and set the root logger to DEBUG here.
    worker = Worker.__new__(Worker)
    worker.spinner = terminal.Spinner()
    logger = logging.Logger("root-under-test")
    logger.addHandler(logging.StreamHandler())
    worker.on_setup_root_logger(logger, logging.WARNING)
    assert logger.level == logging.WARNING
    assert not logger.isEnabledFor(logging.DEBUG)
    assert [type(h) for h in logger.handlers] == [logging.StreamHandler]


async def test_topic_partitions_read_aiokafkas_cluster_metadata():
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")  # never started
    client = consumer._client
    assert callable(client.force_metadata_update)
    assert client.cluster.partitions_for_topic("absent") is None
    await consumer.stop()


def test_no_module_but_the_engine_touches_a_private_attribute():
    """The other half of the boundary (`make lint` checks the imports)."""
    import ast
    from pathlib import Path

    package = Path(engine.__file__).parents[1]
    allowed = {"_asdict", "_fields", "_replace", "_make"}  # NamedTuple's public API
    found = []
    for path in package.rglob("*.py"):
        if path.name == "engine.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in allowed
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(package)}:{node.lineno} .{node.attr}")
    assert found == []
