"""Faust wiring: intake task -> by-buyer topic -> state agent -> result sink.

Data flow (one way):

    orders, refunds --intake (aiokafka, group <app_id>-intake)--> <app_id>-payments-by-buyer
        --state agent (Faust, group <app_id>)--> `buyers` table (RocksDB + changelog)
        --> ResultSink (MySQL/SQLite)

Intake sends each batch's valid records as one message per owning partition, so every state
event holds records of one partition only: the partition of the table (and of its changelog)
that holds those buyers. Faust owns the table's assignment, recovery and standby replicas;
the state stage reads and writes it a batch at a time (see `store`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faust.types import TP, EventT
from prometheus_client import generate_latest

from coupon_stream import metrics, restore
from coupon_stream.intake import Intake
from coupon_stream.kafka import KafkaOut, PartitionReader
from coupon_stream.logs import Worker, logging_config
from coupon_stream.restore import ChangelogReader
from coupon_stream.settings import Settings
from coupon_stream.sink import ResultSink
from coupon_stream.state_stage import ReadBack, StateStage
from coupon_stream.store import MemoryStore, PartitionStore, RocksStore

log = logging.getLogger(__name__)

TABLE_NAME = "buyers"
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
        changelog_ends: dict[int, int] | None = None,
    ) -> None:
        s = self.settings = settings
        self.app = faust.App(
            s.app_id,
            broker=s.broker,
            store=store,
            datadir=str(s.data_dir),
            topic_partitions=s.partitions,
            web_port=s.web_port,
            web_host="0.0.0.0",
            table_standby_replicas=s.standby_replicas,
            topic_replication_factor=s.replication_factor,
            broker_session_timeout=s.session_timeout,
            broker_heartbeat_interval=max(0.5, s.session_timeout / 10),
            logging_config=logging_config(s.log_format, s.log_level),
            Worker=Worker,
            Table=BuyersTable,
            consumer_auto_offset_reset="earliest",
            key_serializer="raw",
            value_serializer="raw",
        )
        self.out = out or KafkaOut(s)
        self.sink = sink or ResultSink(
            s.db_url.get_secret_value(), s.result_table, safe_url=s.db_url_safe
        )
        self._sink_started = False
        self._acker: faust.StreamT | None = None
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.by_buyer = self.app.topic(
            s.by_buyer_topic, partitions=s.partitions, internal=True, **raw
        )
        rocks = store.startswith("rocksdb")
        self.buyers = self.app.Table(
            TABLE_NAME,
            partitions=s.partitions,
            options=_rocksdb_options(s) if rocks else None,
            help="kept record of each (biz_order_id, pay_status), per buyer",
            key_type=bytes,
            value_type=bytes,
            on_changelog_event=self._on_restored,
        )
        changelog = self.buyers.changelog_topic.get_topic_name()
        self.partitions: PartitionStore = (
            RocksStore(self.buyers.data, changelog) if rocks else MemoryStore()
        )
        self.reader = reader or PartitionReader(s)
        self.restore_reader = restore_reader or PartitionReader(s)
        # Read before the app starts: the first assignment trusts them (see `_bulk_restore`).
        self._changelog_ends_at_start = changelog_ends
        self.buyers.before_recovery = self._bulk_restore
        self.stage = StateStage(
            s,
            self.partitions,
            self.out,
            self.sink,
            changelog,
            self.reader,
            assignment=lambda: None if self.app.rebalancing else self.app.rebalancing_count,
        )
        self.intake = Intake(s, self.out)
        self.state_agent = self.app.agent(self.by_buyer, name="state")(self._apply)
        self.app.task(self._run_intake)
        self.app.on_before_shutdown.connect(self._stop_out)
        self._register_pages()

    async def _on_restored(self, event: EventT) -> None:
        """Counts changelog records read back into local state (recovery and standbys)."""
        metrics.STATE_RESTORED.inc()

    async def _bulk_restore(self, newly_assigned: set[TP], generation_id: int) -> None:
        """Catch newly assigned active partitions up in bulk (see `restore`).

        Only a speed-up: on any Kafka error Faust's own recovery reads what is left. A
        shutdown stops the reader under it (a SIGTERM during a rebalance): that ends the
        catch-up, it must not crash the worker on its way out.
        """
        changelog = self.stage.changelog_topic
        actives = self.app.assignor.assigned_actives()
        partitions = sorted(
            tp.partition
            for tp in newly_assigned
            if tp.topic == changelog and tp in actives and self.partitions.is_open(tp.partition)
        )
        # Only the first assignment may trust them: the ends only grow, so a stale hint can
        # only make it leave a restore to Faust's recovery, never skip a record.
        hint, self._changelog_ends_at_start = self._changelog_ends_at_start, None
        if not partitions or not self.settings.bulk_restore_seconds:
            return
        try:
            await restore.catch_up(
                self.restore_reader,
                self.partitions,
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
        await self.intake.run()

    async def _stop_out(self, app: faust.App, **kwargs: Any) -> None:
        """After the consumers stopped: deliver what is still in flight, then close."""
        await self.out.stop()
        await self.reader.stop()
        await self.restore_reader.stop()

    # -- state stage --------------------------------------------------------------------------

    async def _apply(self, stream: faust.StreamT) -> None:
        await self.start_sink()
        self._acker = manual = stream.noack()
        flusher = asyncio.ensure_future(self._flush_periodically())
        try:
            committed = self.app.consumer._committed_offset  # Faust's view after its seek
            async for event in manual.events():
                msg = event.message
                await self.stage.add(
                    event.value, msg.partition, msg.offset, event, committed.get(msg.tp)
                )
                if len(self.stage.pending.rows) >= self.settings.max_pending_rows:
                    await self.flush()  # backpressure: stop consuming until the sink catches up
        finally:
            flusher.cancel()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """Flush the state stage, then commit the offsets it has made safe.

        The stage applies every offset of a partition in order, so after a flush everything
        below the highest flushed offset is in the changelog and the result table: that is
        what we commit, ourselves. Faust's own ack-based commit can skip a message it never
        delivered, or stall behind it for good; the events are still acknowledged so that
        Faust's rebalance (which waits for acks) goes on.
        """
        tokens, written = await self.stage.flush()
        events = [t for t in tokens if not isinstance(t, ReadBack)]
        if not written:
            # Given up during a rebalance: acknowledged, Faust would commit them as it hands
            # the partitions over. Released instead, so its wait for acks is not held either.
            for event in events:
                self.app.consumer._unacked_messages.discard(event.message)
            return
        offsets: dict[Any, int] = {}
        for event in events:
            tp = event.message.tp
            offsets[tp] = max(offsets.get(tp, 0), event.message.offset + 1)
            await self._acker.ack(event)
        topic = self.by_buyer.get_topic_name()
        for token in tokens:
            if isinstance(token, ReadBack):  # applied from Kafka, no event to acknowledge
                tp = TP(topic, token.partition)
                offsets[tp] = max(offsets.get(tp, 0), token.next_offset)
        if offsets:
            await self.commit(offsets)

    async def commit(self, offsets: dict[Any, int]) -> None:
        # Faust's commit of explicit offsets: only partitions still assigned are committed.
        await self.app.consumer._commit_offsets(offsets)

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

            def behind(tp: TP, done: int) -> None:
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - not known yet right after assignment
                    return
                if end is not None:
                    metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - done))

            for tp in consumer.assignment():
                if tp.topic in watched:
                    behind(tp, consumer._committed_offset.get(tp) or 0)
            # A standby copy is as current as the last changelog offset Faust applied to it.
            recovery = app.tables.recovery
            for tp in recovery.standby_tps:
                applied = recovery.standby_offsets.get(tp)
                behind(tp, 0 if applied is None else applied + 1)
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
            """Buyers held in local RocksDB per partition (active and standby copies)."""
            for partition, db in getattr(self.buyers.data, "_dbs", {}).items():
                try:
                    keys = db.property_int_value("rocksdb.estimate-num-keys")
                except Exception:  # noqa: BLE001 - not a rocksdict store
                    continue
                metrics.STATE_KEYS.labels(str(partition)).set(keys or 0)

        @app.on_partitions_assigned.connect
        async def assigned(app: faust.App, assigned: set, **kwargs: Any) -> None:
            mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in watched)
            log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

        @app.on_partitions_revoked.connect
        async def revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
            self.stage.forget_deliveries()
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
        """Ready when not rebalancing, tables recovered, and the database answers."""
        app = self.app
        recovered = bool(app.tables.recovery.completed.is_set()) if app.tables else False
        database = await self.sink.ping()
        rebalancing = bool(app.rebalancing)
        return {
            "ready": recovered and database and not rebalancing,
            "tables_recovered": recovered,
            "database": database,
            "rebalancing": rebalancing,
        }


class BuyersTable(faust.Table):
    """Faust's table, with a hook that runs after local partitions open, before recovery."""

    before_recovery: Callable[[set[TP], int], Awaitable[None]] | None = None

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        if self.before_recovery is not None:
            await self.before_recovery(newly_assigned, generation_id)


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
