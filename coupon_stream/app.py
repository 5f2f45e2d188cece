"""Faust wiring: intake task -> by-buyer topic -> state agent -> checkpoint -> result sink.

Data flow (one way):

    orders, refunds --intake (aiokafka, group <app_id>-intake)--> <app_id>-payments-by-buyer
        --state agent (Faust, group <app_id>)--> `entries` and `days` tables (RocksDB +
        changelogs) --checkpoint--> ResultSink (MySQL/SQLite)

Intake sends each batch's valid records as one message per owning partition, so every state
event holds records of one partition only: the partition of the tables (and of their
changelogs) that holds those buyers. Faust owns the tables' assignment, recovery and standby
replicas; the state stage and the checkpoint read and write them a batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faust.stores.rocksdb import RocksDBOptions
from faust.types import TP, EventT
from prometheus_client import generate_latest

from coupon_stream.connectors import clients, restore
from coupon_stream.connectors.kafka import KafkaOut, PartitionReader, behind
from coupon_stream.connectors.restore import ChangelogReader
from coupon_stream.connectors.store import (
    LookupTunedOptions,
    MemoryStore,
    PartitionStore,
    RocksStore,
)
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import AccessRefused, Backoff, Fault, classify
from coupon_stream.foundation.health import StallWatch
from coupon_stream.foundation.logs import Worker, logging_config
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.checkpoint import Checkpointer
from coupon_stream.pipeline.intake import Intake
from coupon_stream.pipeline.sink import ResultSink
from coupon_stream.pipeline.state_stage import StateFormatError, StateStage, TableCache

log = logging.getLogger(__name__)

TABLE_HELP = {
    "entries": "kept copy of each (buyer_id, biz_order_id, pay_status)",
    "days": "running cumulate_amount, MIN(gmt_create), MAX(gmt_modified) per (buyer_id, day)",
}
TAIL_CHECK_SECONDS = 5.0
# aiohttp wants the charset apart from the content type; the exposition format is UTF-8.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


class CouponStream:
    """The Faust app with its topics, table and agents, built from one Settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: str = "rocksdb://",
        sink: ResultSink | None = None,
        out: KafkaOut | None = None,
        reader: PartitionReader | None = None,
        restore_reader: ChangelogReader | None = None,
        changelog_ends: dict[str, dict[int, int]] | None = None,
    ) -> None:
        s = self.settings = settings
        self.app = faust.App(
            s.app_id,
            broker=s.broker,
            broker_credentials=broker_credentials(s),
            store=store,
            datadir=str(s.data_dir),
            topic_partitions=s.partitions,
            web_port=s.web_port,
            web_bind=s.web_host,
            web_host=s.web_host,
            # The port serves operators: /metrics and /health only. Faust's views would show
            # any buyer's kept orders (/table) and the assignment (/router) to anyone.
            web_tables_enabled=False,
            web_router_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
            table_standby_replicas=s.standby_replicas,
            topic_replication_factor=s.replication_factor,
            broker_session_timeout=s.session_timeout,
            broker_heartbeat_interval=max(0.5, s.session_timeout / 10),
            logging_config=logging_config(s.log_format, s.log_level),
            Worker=Worker,
            Table=StateTable,
            consumer_auto_offset_reset="earliest",
            key_serializer="raw",
            value_serializer="raw",
        )
        self.out = out or KafkaOut(s)
        self.sink = sink or ResultSink.of(s)
        self._sink_started = False
        self._acker: faust.StreamT | None = None
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.by_buyer = self.app.topic(
            s.by_buyer_topic, partitions=s.partitions, internal=True, **raw
        )
        rocks = store.startswith("rocksdb")
        self.caches: dict[str, TableCache] = {}
        for name in STATE_TABLES:
            table = self.app.Table(
                name,
                partitions=s.partitions,
                options=_rocksdb_options(s) if rocks else None,
                help=TABLE_HELP[name],
                key_type=bytes,
                value_type=bytes,
                on_changelog_event=self._on_restored,
            )
            changelog = table.changelog_topic.get_topic_name()
            partitions: PartitionStore = (
                RocksStore(table.data, changelog) if rocks else MemoryStore()
            )
            table.before_recovery = self._bulk_restore
            self.caches[name] = TableCache(name, partitions, changelog)
        self.reader = reader or PartitionReader(s)
        self.restore_reader = restore_reader or PartitionReader(s)
        # Read before the app starts: the first assignment trusts them (see `_bulk_restore`).
        self._changelog_ends_at_start = changelog_ends
        self.stage = StateStage(
            s,
            self.caches["entries"],
            self.caches["days"],
            self.out,
            self.reader,
            assignment=lambda: None if self.app.rebalancing else self.app.rebalancing_count,
        )
        self.stalls = StallWatch(s.stall_seconds)
        self.checkpointer = Checkpointer(
            s,
            self.stage,
            self.out,
            self.sink,
            commit=self.commit_partitions,
            acknowledge=self._acknowledge,
            stalls=self.stalls,
        )
        self.intake = Intake(s, self.out)
        self.state_agent = self.app.agent(self.by_buyer, name="state")(self._apply)
        self.app.task(self._run_intake)
        self.app.on_before_shutdown.connect(self._stop_out)
        self._register_pages()

    async def _on_restored(self, event: EventT) -> None:
        """Counts changelog records read back into local state (recovery and standbys)."""
        metrics.STATE_RESTORED.inc()

    async def _bulk_restore(
        self, changelog: str, newly_assigned: set[TP], generation_id: int
    ) -> None:
        """Catch a table's newly assigned active partitions up in bulk (see `restore`).

        Only a speed-up: on any Kafka error Faust's own recovery reads what is left. A
        shutdown stops the reader under it (a SIGTERM during a rebalance): that ends the
        catch-up, it must not crash the worker on its way out.
        """
        store = next(c.store for c in self.caches.values() if c.changelog_topic == changelog)
        actives = self.app.assignor.assigned_actives()
        partitions = sorted(
            tp.partition
            for tp in newly_assigned
            if tp.topic == changelog and tp in actives and store.is_open(tp.partition)
        )
        # Only the first assignment may trust them: the ends only grow, so a stale hint can
        # only make it leave a restore to Faust's recovery, never skip a record.
        hints = self._changelog_ends_at_start or {}
        hint = hints.pop(changelog, None)
        if not partitions or not self.settings.bulk_restore_seconds:
            return
        try:
            await restore.catch_up(
                self.restore_reader,
                store,
                changelog,
                partitions,
                budget=self.settings.bulk_restore_seconds,
                still_current=lambda: self.app.consumer_generation_id == generation_id,
                ends_hint=hint,
            )
        except (KafkaError, OSError) as exc:
            log.warning("bulk restore stopped, Faust's recovery reads the rest: %r", exc)
        except ConsumerStoppedError:
            log.info("bulk restore stopped: the worker is shutting down")

    async def _run_intake(self) -> None:
        try:
            await self.intake.run()
        except Exception as exc:
            await self.stop_worker("the intake", exc)
            raise

    async def stop_worker(self, what: str, exc: BaseException) -> None:
        """Stop the worker for an error no retry can fix, with one CRITICAL line saying why.

        Faust's supervisor would restart a failed agent or task for ever while the worker
        looks healthy; an operator must see it instead. A refused access (credentials,
        certificates, ACLs, grants) is said as such: who refused whom, and what.
        """
        refused = exc if isinstance(exc, AccessRefused) else None
        refused = refused or clients.kafka_refused(self.settings, exc, f"running {what}")
        if refused is not None:
            log.critical("access refused, stopping the worker: %s", refused)
        else:
            log.critical("%s failed for good, stopping the worker: %r", what, exc)
        await self.app.crash(refused or exc)

    async def _stop_out(self, app: faust.App, **kwargs: Any) -> None:
        """After the consumers stopped: deliver what is still in flight, then close."""
        await self.out.stop()
        await self.reader.stop()
        await self.restore_reader.stop()

    # -- state stage --------------------------------------------------------------------------

    async def _apply(self, stream: faust.StreamT) -> None:
        try:
            await self.start_sink()
        except Exception as exc:
            await self.stop_worker("the result sink", exc)
            raise
        self._acker = manual = stream.noack()
        flusher = asyncio.ensure_future(self._flush_periodically())
        try:
            committed = self.app.consumer._committed_offset  # Faust's view after its seek
            async for event in manual.events():
                msg = event.message
                try:
                    await self.stage.add(
                        event.value,
                        msg.partition,
                        msg.offset,
                        event,
                        committed.get(msg.tp),
                        received_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                    )
                except StateFormatError as exc:
                    log.critical("%s", exc)
                    await self.app.crash(exc)
                    return
                except Exception as exc:
                    await self.stop_worker("the state agent", exc)
                    raise
                if self.stage.pending.rows() >= self.settings.max_pending_rows:
                    await self.flush()  # backpressure: stop consuming until the sink catches up
        finally:
            flusher.cancel()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """One checkpoint (see `checkpoint`); one that fails for good stops the worker.

        It only raises for an error that no retry can fix, and carrying on would leave the
        worker up but committing nothing.
        """
        try:
            await self.checkpointer.run()
        except Exception as exc:
            await self.stop_worker("a checkpoint", exc)
            raise

    async def _acknowledge(self, tokens: list[object], committed: bool) -> None:
        """Acknowledge the events of a checkpoint, or release them if it was not committed.

        We commit offsets ourselves (Faust's ack-based commit can skip a message it never
        delivered, or stall behind it for good); the events are still acknowledged so that
        Faust's rebalance, which waits for acks, goes on. Acknowledged without a commit,
        Faust would commit them as it hands the partitions over: those are released.
        """
        for token in tokens:
            if not isinstance(token, faust.types.EventT):
                continue  # a ReadBack: applied from Kafka, no event to acknowledge
            if committed and self._acker is not None:
                await self._acker.ack(token)
            else:
                self.app.consumer._unacked_messages.discard(token.message)

    async def commit_partitions(self, offsets: dict[int, int]) -> bool:
        """Commit by-buyer offsets, retrying what can succeed; False once not ours."""
        topic = self.by_buyer.get_topic_name()
        backoff = Backoff()
        while True:
            try:
                return await self.commit({TP(topic, p): o for p, o in offsets.items()})
            except Exception as exc:  # noqa: BLE001 - classified below
                if classify(exc) is Fault.PERMANENT or self.app.rebalancing:
                    log.warning("offset commit failed, the messages will be replayed: %r", exc)
                    return False
                self.stalls.failed(None, f"offset commit failed: {exc!r}")
                await backoff.sleep()

    async def commit(self, offsets: dict[Any, int]) -> bool:
        # Faust's commit of explicit offsets: only partitions still assigned are committed.
        return bool(await self.app.consumer._commit_offsets(offsets))

    async def start_sink(self) -> None:
        if not self._sink_started:
            await self.sink.start()
            self._sink_started = True
            log.info(
                "result table %s ready at %s", self.settings.result_table, self.settings.db_url_safe
            )

    # -- web: metrics and health ------------------------------------------------------------

    def _register_pages(self) -> None:
        app = self.app
        watched = {self.by_buyer.get_topic_name()}

        @app.timer(interval=5.0)
        async def export_lag() -> None:
            """Messages behind each assigned partition's end: by-buyer, intake and standby."""
            consumer = app.consumer

            def export(tp: TP, done: int) -> int | None:
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - not known yet right after assignment
                    return None
                if end is None:
                    return None
                lag = behind(end, done)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
                return lag

            by_buyer: dict[int, int] = {}
            for tp in consumer.assignment():
                if tp.topic in watched:
                    lag = export(tp, consumer._committed_offset.get(tp) or 0)
                    if lag is not None:
                        by_buyer[tp.partition] = lag
            if not self.sink.available and self.sink.last_error:
                self.stalls.failed(None, self.sink.last_error)
            self.stalls.check(by_buyer)
            # A standby copy is as current as the last changelog offset Faust applied to it.
            recovery = app.tables.recovery
            for tp in recovery.standby_tps:
                applied = recovery.standby_offsets.get(tp)
                export(tp, 0 if applied is None else applied + 1)
            for tp, n in self.intake.lag().items():
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(n)

        @app.timer(interval=TAIL_CHECK_SECONDS)
        async def repair_undelivered_tails() -> None:
            """Read back by-buyer messages the consumer moved past when none came after them."""
            if app.rebalancing or self._acker is None:
                return
            consumer = app.consumer
            mine = {tp.partition: tp for tp in consumer.assignment() if tp.topic in watched}
            if not mine:
                return
            try:  # from the broker: the consumer's own view stops with its fetches
                ends = await self.reader.end_offsets(self.settings.by_buyer_topic, mine)
                for partition, end in ends.items():
                    committed = consumer._committed_offset.get(mine[partition])
                    await self.stage.repair_tail(partition, end, committed)
            except KafkaError as exc:
                log.warning("tail check skipped, Kafka did not answer: %r", exc)
            except Exception:  # a timer that raises stops the worker; this check can wait
                log.exception("tail check failed; trying again in %.0f s", TAIL_CHECK_SECONDS)

        @app.timer(interval=10.0)
        async def export_state_size() -> None:
            """Keys held in local RocksDB per table and partition (active and standby copies)."""
            for name in STATE_TABLES:
                for partition, db in getattr(app.tables[name].data, "_dbs", {}).items():
                    try:
                        keys = db.property_int_value("rocksdb.estimate-num-keys")
                    except Exception:  # noqa: BLE001 - not a rocksdict store
                        continue
                    metrics.STATE_KEYS.labels(name, str(partition)).set(keys or 0)

        @app.on_partitions_assigned.connect
        async def assigned(app: faust.App, assigned: set, **kwargs: Any) -> None:
            mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in watched)
            self.stalls.assigned(tp.partition for tp in assigned if tp.topic in watched)
            metrics.REBALANCES.inc()
            log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

        @app.on_partitions_revoked.connect
        async def revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
            await self._acknowledge(await self.stage.forget(), False)
            self.stalls.revoked()
            metrics.CONSUMER_LAG.clear()
            log.info("revoked %d partitions", len(revoked))

        @app.page("/metrics")
        async def metrics_page(web: Any, request: Any) -> Any:
            return web.bytes(generate_latest(), content_type=METRICS_CONTENT_TYPE)

        @app.page("/health/live")
        async def live(web: Any, request: Any) -> Any:
            return web.json({"status": "alive", "time": time.time()})

        @app.page("/health/ready")
        async def ready(web: Any, request: Any) -> Any:
            status = await self.readiness()
            return web.json(status, status=200 if status["ready"] else 503)

    async def readiness(self) -> dict[str, Any]:
        """Ready when not rebalancing, tables recovered, the database answers, and no
        partition is stalled (lag, and nothing committed for COUPON_STALL_SECONDS)."""
        app = self.app
        recovered = bool(app.tables.recovery.completed.is_set()) if app.tables else False
        database = await self.sink.ping()
        rebalancing = bool(app.rebalancing)
        stalled = sorted(self.stalls.stalled)
        return {
            "ready": recovered and database and not rebalancing and not stalled,
            "tables_recovered": recovered,
            "database": database,
            "rebalancing": rebalancing,
            "stalled_partitions": stalled,
        }


class StateTable(faust.Table):
    """Faust's table, with a hook that runs after local partitions open, before recovery,
    and RocksDB filters tuned for lookups of absent keys (`store.LookupTunedOptions`)."""

    before_recovery: Callable[[str, set[TP], int], Awaitable[None]] | None = None

    def _new_store(self) -> Any:
        store = super()._new_store()
        options = getattr(store, "rocksdb_options", None)
        if isinstance(options, RocksDBOptions):
            store.rocksdb_options = LookupTunedOptions.like(options)
        return store

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        if self.before_recovery is not None:
            changelog = self.changelog_topic.get_topic_name()
            await self.before_recovery(changelog, newly_assigned, generation_id)


def broker_credentials(s: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's form of `clients.kafka_auth`: its consumer, producer and admin connect alike."""
    auth = clients.kafka_auth(s)
    protocol = auth["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(auth["ssl_context"])
    return faust.SASLCredentials(
        username=auth["sasl_plain_username"],
        password=auth["sasl_plain_password"],
        mechanism=auth["sasl_mechanism"],
        ssl_context=auth.get("ssl_context"),
    )


def _rocksdb_options(s: Settings) -> dict[str, Any]:
    """RocksDB sizes per table partition.

    Faust's defaults (a 2 GiB block cache and up to 3 x 64 MiB memtables) are per partition,
    so a worker holding 8 partitions could grow past 17 GiB; these settings bound it.
    """
    mib = 1024 * 1024
    return {
        "driver": "rocksdict",
        "write_buffer_size": s.rocksdb_write_buffer_mb * mib,
        "block_cache_size": s.rocksdb_block_cache_mb * mib,
    }
