"""Intake: orders and refunds in, valid rows out to the by-buyer topic, bad messages aside.

Faust's per-message stream machinery would cost more than all the rest of a record's work
(docs/performance.md, "History"), so intake reads whole fetched batches with a plain
aiokafka consumer (its own group, `<app_id>-intake`) and sends one message per owning
partition and batch. Source offsets are committed only after those sends are acknowledged:
a crash replays the batch, which is harmless because a copy that arrives twice is a
duplicate to the state stage.

Sizes are bounded here, so that nothing downstream can meet a message Kafka refuses: a row
whose encoding is over MAX_RECORD_BYTES is dead-lettered ("too_large"), and by-buyer
messages hold at most MAX_MESSAGE_BYTES of rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from coupon_stream.connectors import clients
from coupon_stream.connectors.clients import AIOKafkaConsumer, RebalanceListener, TopicPartition
from coupon_stream.connectors.faults import (
    Backoff,
    CommitFailedError,
    KafkaError,
    refusal,
    retry,
)
from coupon_stream.connectors.kafka import DeadLetter, KafkaOut, behind
from coupon_stream.core.records import (
    BUYER,
    MAX_TIMESTAMP_CHARS,
    ORDER,
    STATUS,
    BadRecord,
    Row,
    Source,
    encode_rows,
    partition_for_buyer,
    read_row,
)
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings

log = logging.getLogger(__name__)

# Kafka's default message.max.bytes is 1 MiB; by-buyer messages stay far below it.
MAX_MESSAGE_BYTES = 64 * 1024
# One row (encode_rows([row])) that the state may keep; four fit in one by-buyer message.
MAX_RECORD_BYTES = 16 * 1024
MAX_RETRY_DELAY = 2.0
# A row's encoding holds its four strings, three integers of at most 20 characters, brackets,
# commas and quotes; msgspec writes a character in at most 6 bytes (\u00XX), and both
# timestamps are at most MAX_TIMESTAMP_CHARS long. So a row whose biz_order_id and pay_status
# hold at most this many characters together is below MAX_RECORD_BYTES without measuring it.
_ROW_OVERHEAD = 80
_SURELY_SMALL_CHARS = (MAX_RECORD_BYTES - _ROW_OVERHEAD) // 6 - 2 * MAX_TIMESTAMP_CHARS


class Message(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class Routed:
    """One intake batch split into per-partition rows and dead letters."""

    by_partition: dict[int, list[Row]] = field(default_factory=lambda: defaultdict(list))
    dead: list[DeadLetter] = field(default_factory=list)


def route(messages: Iterable[Message], sources: Mapping[str, Source], partitions: int) -> Routed:
    """Validate each message and group the valid rows by the partition that owns their buyer."""
    routed = Routed()
    by_partition = routed.by_partition
    for msg in messages:
        try:
            row = read_row(msg.value, sources[msg.topic])
        except BadRecord as bad:
            routed.dead.append(
                DeadLetter(
                    msg.key, msg.value, msg.topic, msg.partition, msg.offset, bad.reason, bad.kind
                )
            )
            continue
        if len(row[ORDER]) + len(row[STATUS]) > _SURELY_SMALL_CHARS:
            size = len(encode_rows([row]))
            if size > MAX_RECORD_BYTES:
                routed.dead.append(
                    DeadLetter(
                        msg.key,
                        msg.value,
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        f"record too large to keep in state: {size} bytes of "
                        f"biz_order_id/pay_status/timestamps (limit {MAX_RECORD_BYTES})",
                        "too_large",
                    )
                )
                continue
        by_partition[partition_for_buyer(row[BUYER], partitions)].append(row)
    return routed


def split_rows(rows: list[Row], limit: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """The by-buyer message values for `rows`: one, or several if one would be too large.

    Each value is at most `limit` bytes unless it holds a single row larger than that
    (`route` keeps rows below MAX_RECORD_BYTES, a quarter of the default limit).
    """
    raw = encode_rows(rows)
    if len(raw) <= limit or len(rows) == 1:
        return [raw]
    half = len(rows) // 2
    return split_rows(rows[:half], limit) + split_rows(rows[half:], limit)


class Intake:
    """The intake loop of one worker: fetch, route, send, then commit."""

    def __init__(self, settings: Settings, out: KafkaOut) -> None:
        self.settings = settings
        self.out = out
        self.sources = {
            settings.orders_topic: Source.ORDERS,
            settings.refunds_topic: Source.REFUNDS,
        }
        self.in_flight = asyncio.Lock()  # a batch is sent and committed before partitions move
        self.consumer: AIOKafkaConsumer | None = None
        self.committed: dict[TopicPartition, int] = {}  # for the lag gauge

    async def run(self) -> None:
        s = self.settings
        consumer = self.consumer = clients.consumer(
            s,
            group_id=s.intake_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout * 1000),
            heartbeat_interval_ms=max(500, int(s.session_timeout * 100)),
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        consumer.subscribe(list(self.sources), listener=_CommitFirst(self))
        try:
            await consumer.start()
            await self._check_topics(consumer)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=s.intake_batch)
                if batches:
                    async with self.in_flight:
                        await self.forward_until_sent(batches)
                        await self._commit(consumer, batches)
        except Exception as exc:
            refused = clients.kafka_refused(s, exc, "running the intake")
            if refused is not None:
                raise refused from exc
            raise
        finally:
            await consumer.stop()

    async def forward_until_sent(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        """Forward a batch, again and again if Kafka refuses it: nothing is committed before.

        A re-sent batch is harmless (the state stage counts each copy once), and an intake
        that gave up would leave the worker up but reading nothing. An error that no retry
        can fix (`coupon_stream.connectors.faults`: a message too large, an unauthorized topic) is
        raised instead, so the worker stops loudly rather than loop: it cannot be one
        record's fault, since `route` bounds records and dead letters are cut to fit
        (`KafkaOut.dead_letter`), so it is the topics' or the broker's configuration.
        """

        def failed(exc: BaseException, delay: float) -> None:
            metrics.INTAKE_RETRIES.inc()
            log.error("intake could not forward a batch, retrying in %.1f s: %r", delay, exc)

        try:
            await retry(
                partial(self.forward, batches),
                backoff=Backoff(0.1, MAX_RETRY_DELAY),
                failed=failed,
            )
        except Exception as exc:
            log.error(
                "intake: Kafka refused a batch for good (%r); no retry can fix this, check the "
                "topics and the broker; stopping",
                exc,
            )
            raise

    async def forward(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        """Send one fetched batch on and wait until Kafka has acknowledged all of it."""
        messages = [m for msgs in batches.values() for m in msgs]
        for tp, msgs in batches.items():
            metrics.MESSAGES_CONSUMED.labels(tp.topic).inc(len(msgs))
        routed = route(messages, self.sources, self.settings.partitions)
        topic = self.settings.by_buyer_topic
        sends = [
            await self.out.send(topic, value, partition=part)
            for part, rows in routed.by_partition.items()
            for value in split_rows(rows)
        ]
        for dead in routed.dead:
            sends.append(await self.out.dead_letter(dead))
        await asyncio.gather(*sends)

    async def _commit(
        self, consumer: AIOKafkaConsumer, batches: Mapping[TopicPartition, list[Any]]
    ) -> None:
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
        try:
            await consumer.commit(offsets)
            self.committed.update(offsets)
        except (CommitFailedError, KafkaError) as exc:
            if refusal(exc) is not None:
                raise  # the group's ACL: every commit would fail, never replay for ever
            # The batch is already forwarded; whoever gets these partitions replays it, and the
            # state stage counts each copy once.
            log.warning("intake commit failed, the batch will be replayed: %s", exc)

    async def load_committed(self, partitions: Iterable[TopicPartition]) -> None:
        """Start the lag gauge from the group's committed offsets, not from zero.

        Only the gauge depends on it, so a slow or failed lookup is logged and skipped.
        """
        consumer = self.consumer
        if consumer is None:
            return
        try:
            for tp in partitions:
                offset = await asyncio.wait_for(consumer.committed(tp), 5)
                if offset is not None:
                    self.committed[tp] = offset
        except (TimeoutError, KafkaError) as exc:
            log.warning("intake could not read its committed offsets for the lag gauge: %r", exc)

    def lag(self) -> dict[TopicPartition, int]:
        """Messages between each assigned partition's end and the committed offset."""
        consumer = self.consumer
        if consumer is None:
            return {}
        lags = {}
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None:
                lags[tp] = behind(end, self.committed.get(tp))
        return lags

    async def _check_topics(self, consumer: AIOKafkaConsumer) -> None:
        topics = await consumer.topics()
        for topic in self.sources:
            if topic not in topics:
                log.error(
                    "input topic %s does not exist; this worker reads it as soon as it is "
                    "created (coupon-stream topics)",
                    topic,
                )


class _CommitFirst(RebalanceListener):
    """Let the batch in flight finish (sent and committed) before partitions are given up."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.intake.in_flight:
            for tp in revoked:
                self.intake.committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        log.info("intake assigned %d partitions: %s", len(mine), ", ".join(mine))
        await self.intake.load_committed(assigned)
