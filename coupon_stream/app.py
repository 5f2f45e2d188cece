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
from collections.abc import Mapping
from typing import Any, cast

from aiokafka.errors import ConsumerStoppedError, KafkaError
from prometheus_client import generate_latest

from coupon_stream.connectors import clients, engine, restore
from coupon_stream.connectors.engine import TP, Event, Stream
from coupon_stream.connectors.kafka import KafkaOut, PartitionReader, behind
from coupon_stream.connectors.restore import ChangelogReader
from coupon_stream.connectors.store import MemoryStore, PartitionStore
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import AccessRefused, retry
from coupon_stream.foundation.health import StallWatch
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
        self.app = engine.build_app(s, store=store)
        self.out = out or KafkaOut(s)
        self.sink = sink or ResultSink.of(s)
        self._sink_started = False
        self._acker: Stream | None = None
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.by_buyer = self.app.topic(
            s.by_buyer_topic, partitions=s.partitions, internal=True, **raw
        )
        rocks = store.startswith("rocksdb")
        self.caches: dict[str, TableCache] = {}
        self.tables: dict[str, engine.StateTable] = {}
        for name in STATE_TABLES:
            table = self.tables[name] = engine.state_table(
                self.app,
                name,
                options=engine.rocksdb_options(s) if rocks else None,
                help=TABLE_HELP[name],
                on_restored=self._on_restored,
                before_recovery=self._bulk_restore,
            )
            changelog = engine.changelog_topic(table)
            partitions: PartitionStore = (
                engine.RocksStore(table.data, changelog) if rocks else MemoryStore()
            )
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
            assignment=self._assignment,
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
        engine.on_before_shutdown(self.app, self._stop_out)
        self._by_buyer_topic = self.by_buyer.get_topic_name()
        self._register()

    def _assignment(self) -> int | None:
        """Which assignment this is (None while rebalancing): work of an older one is void."""
        return None if self.app.rebalancing else int(self.app.rebalancing_count)

    async def _on_restored(self, event: Event) -> None:
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
        actives = engine.active_partitions(self.app, changelog)
        partitions = sorted(
            tp.partition
            for tp in newly_assigned
            if tp.topic == changelog and tp.partition in actives and store.is_open(tp.partition)
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
                still_current=lambda: engine.generation(self.app) == generation_id,
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
        await engine.crash(self.app, refused or exc)

    async def _stop_out(self) -> None:
        """After the consumers stopped: deliver what is still in flight, then close."""
        await self.out.stop()
        await self.reader.stop()
        await self.restore_reader.stop()

    # -- state stage --------------------------------------------------------------------------

    async def _apply(self, stream: Stream) -> None:
        try:
            await self.start_sink()
        except Exception as exc:
            await self.stop_worker("the result sink", exc)
            raise
        self._acker = manual = engine.manual_acks(stream)
        periodic = asyncio.ensure_future(self._checkpoint_periodically())
        try:
            async for event in manual.events():
                msg = event.message
                try:
                    await self.stage.add(
                        event.value,
                        msg.partition,
                        msg.offset,
                        event,
                        engine.committed_offset(self.app, msg.tp),  # Faust's, after its seek
                        received_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                    )
                except StateFormatError as exc:
                    log.critical("%s", exc)
                    await engine.crash(self.app, exc)
                    return
                except Exception as exc:
                    await self.stop_worker("the state agent", exc)
                    raise
                if self.stage.pending.rows() >= self.settings.max_pending_rows:
                    await self.checkpoint()  # backpressure: consume no more until it is done
        finally:
            periodic.cancel()

    async def _checkpoint_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            await self.checkpoint()

    async def checkpoint(self) -> None:
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
            if not engine.is_event(token):
                continue  # a ReadBack: applied from Kafka, no event to acknowledge
            event = cast(Event, token)
            if committed and self._acker is not None:
                await self._acker.ack(event)
            else:
                engine.release(self.app, event)

    async def commit_partitions(self, offsets: Mapping[int, int]) -> bool:
        """Commit by-buyer offsets, retrying what can succeed; False once not ours."""
        topic = self.by_buyer.get_topic_name()
        try:
            return await retry(
                lambda: self.commit({TP(topic, p): o for p, o in offsets.items()}),
                wanted=lambda: not self.app.rebalancing,
                failed=lambda exc, _: self.stalls.failed(None, f"offset commit failed: {exc!r}"),
            )
        except Exception as exc:  # noqa: BLE001 - permanent, or given up in a rebalance
            log.warning("offset commit failed, the messages will be replayed: %r", exc)
            return False

    async def commit(self, offsets: dict[TP, int]) -> bool:
        """Whether any partition's offset was committed.

        A partial commit (some partitions revoked meanwhile) counts as committed: the
        revoked partitions' events are acknowledged too, but Faust commits only what it is
        assigned, and their next owner replays them from the offset committed before, which
        the state reads as of (docs/design.md, "The checkpoint").
        """
        return bool(await engine.commit(self.app, offsets))

    async def start_sink(self) -> None:
        if not self._sink_started:
            await self.sink.start()
            self._sink_started = True
            log.info(
                "result table %s ready at %s", self.settings.result_table, self.settings.db_url_safe
            )

    # -- rebalances ----------------------------------------------------------------------------

    async def _assigned(self, assigned: set[TP]) -> None:
        mine = sorted(
            f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic == self._by_buyer_topic
        )
        self.stalls.assigned(tp.partition for tp in assigned if tp.topic == self._by_buyer_topic)
        metrics.REBALANCES.inc()
        log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

    async def _revoked(self, revoked: set[TP]) -> None:
        """Forget the revoked partitions' unwritten work: their next owner replays it."""
        await self._acknowledge(await self.stage.forget(), False)
        self.stalls.revoked()
        metrics.CONSUMER_LAG.clear()
        log.info("revoked %d partitions", len(revoked))

    # -- tail repair ----------------------------------------------------------------------------

    async def _repair_undelivered_tails(self) -> None:
        """Read back by-buyer messages the consumer moved past when none came after them."""
        app = self.app
        if app.rebalancing or self._acker is None:
            return
        mine = {tp.partition: tp for tp in self._assigned_by_buyer()}
        if not mine:
            return
        try:  # from the broker: the consumer's own view stops with its fetches
            ends = await self.reader.end_offsets(self.settings.by_buyer_topic, mine)
            for partition, end in ends.items():
                committed = engine.committed_offset(app, mine[partition])
                await self.stage.repair_tail(partition, end, committed)
        except KafkaError as exc:
            log.warning("tail check skipped, Kafka did not answer: %r", exc)
        except Exception:  # a timer that raises stops the worker; this check can wait
            log.exception("tail check failed; trying again in %.0f s", TAIL_CHECK_SECONDS)

    # -- metrics, stall watch, web pages ------------------------------------------------------

    async def _export_lag(self) -> None:
        """Messages behind each assigned partition's end: by-buyer, intake and standby."""
        app = self.app

        def export(tp: TP, done: int) -> int | None:
            end = engine.highwater(app, tp)
            if end is None:
                return None
            lag = behind(end, done)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            return lag

        by_buyer: dict[int, int] = {}
        for tp in self._assigned_by_buyer():
            lag = export(tp, engine.committed_offset(app, tp) or 0)
            if lag is not None:
                by_buyer[tp.partition] = lag
        if not self.sink.available and self.sink.last_error:
            self.stalls.failed(None, self.sink.last_error)
        self.stalls.check(by_buyer)
        # A standby copy is as current as the last changelog offset Faust applied to it.
        for tp, position in engine.standby_positions(app).items():
            export(tp, position)
        for tp, n in self.intake.lag().items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(n)

    async def _export_state_size(self) -> None:
        """Keys held in local RocksDB per table and partition (active and standby copies)."""
        for name in STATE_TABLES:
            for partition, keys in engine.key_counts(self.tables[name]).items():
                metrics.STATE_KEYS.labels(name, str(partition)).set(keys)

    def _assigned_by_buyer(self) -> list[TP]:
        return [tp for tp in engine.assignment(self.app) if tp.topic == self._by_buyer_topic]

    def _register(self) -> None:
        """Timers, rebalance callbacks and the operators' web pages."""
        app = self.app
        engine.every(app, 5.0, self._export_lag)
        engine.every(app, TAIL_CHECK_SECONDS, self._repair_undelivered_tails)
        engine.every(app, 10.0, self._export_state_size)
        engine.on_assigned(app, self._assigned)
        engine.on_revoked(app, self._revoked)

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
        recovered = engine.recovered(app)
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
