"""Faust wiring: intake agents -> by-buyer topic -> state agent -> result sink.

Data flow (one way):

    orders, refunds --intake agents--> <app_id>-payments-by-buyer (keyed by buyer partition)
        --state agent--> `buyers` table (RocksDB + changelog) --> ResultSink (MySQL/SQLite)

The intake agents validate, dead-letter bad messages, and group valid records by the
partition that owns their buyer, sending one message per partition and batch. The state
agent therefore sees each event hold records of one partition only, which is what Faust's
table needs: a table write goes to the changelog partition of the event being processed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import EventT
from prometheus_client import generate_latest

from coupon_stream import metrics
from coupon_stream.logs import logging_config
from coupon_stream.records import (
    BadRecord,
    Contribution,
    Source,
    contribution_of,
    parse_record,
    partition_for_buyer,
)
from coupon_stream.settings import Settings
from coupon_stream.sink import PendingWrites, ResultSink, RowKey
from coupon_stream.state import (
    BuyerState,
    ResultRow,
    apply_batch,
    buyer_key,
    decode_batch,
    encode_batch,
    retention_cutoff,
)

log = logging.getLogger(__name__)

TABLE_NAME = "buyers"
PRODUCER_BUFFER_MESSAGES = 20_000
WATERMARK_KEY = b"~watermark"  # not a decimal buyer id, so it never collides with one
# aiohttp wants the charset apart from the content type; the exposition format is UTF-8.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
HEADER_TOPIC = "coupon.source.topic"
HEADER_PARTITION = "coupon.source.partition"
HEADER_OFFSET = "coupon.source.offset"
HEADER_REASON = "coupon.error.reason"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A bad message with where it came from and why it cannot count."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    reason: str
    kind: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (HEADER_TOPIC, self.topic.encode()),
            (HEADER_PARTITION, str(self.partition).encode()),
            (HEADER_OFFSET, str(self.offset).encode()),
            (HEADER_REASON, self.reason.encode()),
        ]


@dataclass(slots=True)
class Routed:
    """One intake batch split into per-partition records and dead letters."""

    by_partition: dict[int, list[tuple[int, Contribution]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    dead: list[DeadLetter] = field(default_factory=list)


def route(events: Iterable[EventT], source: Source, partitions: int) -> Routed:
    routed = Routed()
    for event in events:
        msg = event.message
        try:
            record = parse_record(msg.value, source)
        except BadRecord as bad:
            routed.dead.append(
                DeadLetter(
                    msg.key, msg.value, msg.topic, msg.partition, msg.offset, bad.reason, bad.kind
                )
            )
            continue
        part = partition_for_buyer(record.buyer_id, partitions)
        routed.by_partition[part].append((record.buyer_id, contribution_of(record)))
    return routed


class CouponStream:
    """The Faust app with its topics, table and agents, built from one Settings."""

    def __init__(
        self, settings: Settings, *, store: str = "rocksdb://", sink: ResultSink | None = None
    ) -> None:
        s = self.settings = settings
        self.app = faust.App(
            s.app_id,
            broker=s.broker,
            store=store,
            datadir=str(s.data_dir),
            topic_partitions=s.partitions,
            processing_guarantee=s.processing_guarantee.value,
            web_port=s.web_port,
            web_host="0.0.0.0",
            table_standby_replicas=s.standby_replicas,
            topic_replication_factor=s.replication_factor,
            broker_session_timeout=s.session_timeout,
            broker_heartbeat_interval=max(0.5, s.session_timeout / 10),
            logging_config=logging_config(s.log_format, s.log_level),
            # Batch changelog and by-buyer sends into fewer, larger produce requests.
            producer_linger=0.005,
            producer_max_batch_size=256 * 1024,
            consumer_auto_offset_reset="earliest",
            key_serializer="raw",
            value_serializer="raw",
        )
        self.sink = sink or ResultSink(
            s.db_url.get_secret_value(), s.result_table, safe_url=s.db_url_safe
        )
        self._sink_started = False
        self.pending = PendingWrites()
        self._flush_lock = asyncio.Lock()
        self._acker: faust.StreamT | None = None
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.orders = self.app.topic(s.orders_topic, **raw)
        self.refunds = self.app.topic(s.refunds_topic, **raw)
        self.by_buyer = self.app.topic(
            s.by_buyer_topic, partitions=s.partitions, internal=True, **raw
        )
        self.dead_letters = self.app.topic(s.dlq_topic, **raw)
        options = {"driver": "rocksdict"} if store.startswith("rocksdb") else None
        self.buyers = self.app.Table(
            TABLE_NAME,
            partitions=s.partitions,
            options=options,
            help="kept record of each (biz_order_id, pay_status), per buyer",
            key_type=bytes,
            value_type=bytes,
            on_changelog_event=self._on_restored,
        )
        self.orders_agent = self.app.agent(self.orders, name="intake-orders")(
            self._intake(Source.ORDERS)
        )
        self.refunds_agent = self.app.agent(self.refunds, name="intake-refunds")(
            self._intake(Source.REFUNDS)
        )
        self.state_agent = self.app.agent(self.by_buyer, name="state")(self._apply)
        self._register_pages()

    async def _on_restored(self, event: EventT) -> None:
        """Counts changelog records read back into local state (recovery and standbys)."""
        metrics.STATE_RESTORED.inc()

    # -- intake ---------------------------------------------------------------------------

    def _intake(self, source: Source):  # noqa: ANN202 - a Faust agent function
        async def intake(stream: faust.StreamT) -> None:
            s = self.settings
            async for events in stream.take_events(s.intake_batch, within=s.intake_window):
                await self.forward(events, source)

        intake.__name__ = f"intake_{source.value}"
        return intake

    async def forward(self, events: list[EventT], source: Source) -> None:
        """Send one intake batch on: one message per owning partition, dead letters aside.

        The sends are acknowledged before the source offsets are committed (Faust flushes the
        producer before every commit), so a crash replays the batch: harmless, since a copy
        that arrives twice is a duplicate to the state agent.
        """
        if not events:
            return
        topic = events[0].message.topic
        metrics.MESSAGES_CONSUMED.labels(topic).inc(len(events))
        routed = route(events, source, self.settings.partitions)
        for part, items in routed.by_partition.items():
            await self.by_buyer.send(
                key=str(part).encode(), value=encode_batch(items), partition=part
            )
        for dead in routed.dead:
            await self._dead_letter(dead)

    async def _dead_letter(self, dead: DeadLetter) -> None:
        metrics.DEAD_LETTERS.labels(dead.kind).inc()
        log.warning(
            "dead letter: %s[%d]@%d: %s", dead.topic, dead.partition, dead.offset, dead.reason
        )
        await self.dead_letters.send(key=dead.key, value=dead.value, headers=dead.headers())

    # -- dedup + aggregate + sink -----------------------------------------------------------

    def _load(self, buyer_id: int) -> BuyerState:
        return BuyerState.decode(buyer_id, self.buyers.get(buyer_key(buyer_id)))

    async def _apply(self, stream: faust.StreamT) -> None:
        await self.start_sink()
        # Faust pauses every stream to drain its send buffer once it holds 100 messages, and
        # logs a warning each time; one by-buyer message alone writes hundreds of buyers.
        self.app.producer.buffer.max_messages = PRODUCER_BUFFER_MESSAGES
        self._acker = manual = stream.noack()
        flusher = asyncio.ensure_future(self._flush_periodically())
        try:
            async for event in manual.events():
                self.pending.add(await self.apply(event.value, event.message.partition), event)
                if len(self.pending.rows) >= self.settings.max_pending_rows:
                    await self.flush()  # backpressure: stop consuming until the sink catches up
        finally:
            flusher.cancel()

    async def apply(self, raw: bytes, partition: int) -> dict[RowKey, ResultRow | None]:
        """Apply one by-buyer message to the table; return the result rows it touched.

        Every buyer in the message is written back once (one changelog message each), even
        if only duplicates arrived: see `state.apply_batch` for why.
        """
        batch = decode_batch(raw)
        if self.settings.state_retention_days:
            batch = await self._retain(batch, partition)
        result = apply_batch(batch, self._load)
        for buyer_id, state in result.states.items():
            key = buyer_key(buyer_id)
            if state.kept:
                self.buyers[key] = state.encode()
            elif key in self.buyers:
                del self.buyers[key]
        metrics.STATE_BUYERS_WRITTEN.inc(len(result.states))
        for outcome, n in result.outcomes.items():
            metrics.RECORDS.labels(outcome.value).inc(n)
        return result.rows

    # -- bounded state ----------------------------------------------------------------------

    async def _retain(
        self, batch: list[tuple[int, Contribution]], partition: int
    ) -> list[tuple[int, Contribution]]:
        """Advance this partition's watermark, expire old days, dead-letter late records.

        The watermark (newest effect_time seen) lives in the table itself, so it survives
        restarts and moves with the partition. A record older than the retention cutoff
        cannot be matched against dropped state, so it is dead-lettered instead of counted:
        the closed day's row stays as it was.
        """
        if not batch:
            return batch
        days = self.settings.state_retention_days
        old_mark = int(self.buyers.get(WATERMARK_KEY) or 0)
        mark = max(old_mark, max(c.effect_time for _, c in batch))
        cutoff = retention_cutoff(mark, days)
        if mark != old_mark:
            self.buyers[WATERMARK_KEY] = str(mark).encode()
            if not old_mark or retention_cutoff(old_mark, days) < cutoff:
                self._expire(cutoff, partition)
        kept = [(b, c) for b, c in batch if c.effect_time >= cutoff]
        for buyer_id, c in batch:
            if c.effect_time < cutoff:
                reason = (
                    f"effect_time {c.effect_time} is older than the retention cutoff {cutoff} "
                    f"(COUPON_STATE_RETENTION_DAYS={days}); the day is closed"
                )
                record = encode_batch([(buyer_id, c)])
                await self._dead_letter(
                    DeadLetter(
                        None, record, self.settings.by_buyer_topic, partition, -1, reason, "late"
                    )
                )
        return kept

    def _expire(self, cutoff: int, partition: int) -> None:
        """Drop every kept record of this partition's buyers whose day is before `cutoff`."""
        partitions = self.settings.partitions
        owned = [
            k
            for k in list(self.buyers.keys())
            if k != WATERMARK_KEY and partition_for_buyer(int(k), partitions) == partition
        ]
        dropped = entries = 0
        for key in owned:
            state = BuyerState.decode(int(key), self.buyers[key])
            n = state.drop_days_before(cutoff)
            entries += len(state.kept)
            if n:
                dropped += n
                if state.kept:
                    self.buyers[key] = state.encode()
                else:
                    del self.buyers[key]
        metrics.STATE_EXPIRED.inc(dropped)
        metrics.STATE_ENTRIES.labels(str(partition)).set(entries)
        log.info(
            "partition %d: expired %d records of days before %d; %d records kept",
            partition,
            dropped,
            cutoff,
            entries,
        )

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """Write the coalesced rows, then acknowledge the events that produced them.

        Only acknowledged events have their offsets committed, so an offset is never
        committed ahead of the result table; on a crash the unacknowledged events replay.
        One flush at a time keeps the writes of a key in order.
        """
        async with self._flush_lock:
            rows, events = self.pending.take()
            if not events:
                return
            await self.sink.write(rows)
            self.pending.written()
            for event in events:
                await self._acker.ack(event)

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
        watched = {
            self.settings.orders_topic,
            self.settings.refunds_topic,
            self.by_buyer.get_topic_name(),
        }

        @app.timer(interval=5.0)
        async def export_lag() -> None:
            """Messages between each assigned partition's end and its committed offset."""
            consumer = app.consumer
            for tp in consumer.assignment():
                if tp.topic not in watched:
                    continue
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - not known yet right after assignment
                    continue
                committed = consumer._committed_offset.get(tp) or 0
                if end is not None:
                    metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                        max(0, end - committed)
                    )

        @app.timer(interval=10.0)
        async def export_state_size() -> None:
            """Buyers held in local RocksDB per partition (active and standby copies)."""
            for partition, db in getattr(self.buyers.data, "_dbs", {}).items():
                try:
                    keys = db.property_int_value("rocksdb.estimate-num-keys")
                except Exception:  # noqa: BLE001 - not a rocksdict store
                    continue
                metrics.STATE_KEYS.labels(str(partition)).set(keys or 0)

        @app.task
        async def warn_missing_inputs() -> None:
            """Faust skips an input topic that is missing at start: say so, loudly."""
            await asyncio.sleep(5)
            for topic in (self.settings.orders_topic, self.settings.refunds_topic):
                if not app.consumer.topic_partitions(topic):
                    log.error(
                        "input topic %s does not exist: this worker is not reading it. Create "
                        "it (coupon-stream topics) and restart the worker",
                        topic,
                    )

        @app.on_partitions_assigned.connect
        async def assigned(app: faust.App, assigned: set, **kwargs: Any) -> None:
            mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in watched)
            log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

        @app.on_partitions_revoked.connect
        async def revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
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
