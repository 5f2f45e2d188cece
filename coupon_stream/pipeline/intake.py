"""Intake: orders and refunds in, valid rows out to the by-buyer topic, bad messages aside.

Faust's per-message stream machinery would cost more than all the rest of a record's work
(docs/performance.md, "History"), so intake reads whole fetches with a consumer of its own
(`connectors.sources`, its own group `<app_id>-intake`) and sends one message per owning
partition and batch. Source offsets are committed only after those sends are acknowledged:
a crash replays the batch, which is harmless because a copy that arrives twice is a
duplicate to the state stage. Partitions move only while the intake fetches (or stops),
never between a fetch and its commit.

Sizes are bounded here, so that nothing downstream can meet a message Kafka refuses: a row
whose encoding is over MAX_RECORD_BYTES is dead-lettered ("too_large"), and by-buyer
messages hold at most MAX_MESSAGE_BYTES of rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

from coupon_stream.connectors import clients
from coupon_stream.connectors.clients import TopicPartition
from coupon_stream.connectors.faults import (
    Backoff,
    CommitFailedError,
    Fault,
    KafkaError,
    classify,
    refusal,
    retry,
)
from coupon_stream.connectors.kafka import DeadLetter, KafkaOut, behind
from coupon_stream.connectors.sources import Fetched, SourceConsumer
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


@dataclass(slots=True)
class Routed:
    """One intake batch split into per-partition rows and dead letters."""

    by_partition: dict[int, list[Row]] = field(default_factory=lambda: defaultdict(list))
    dead: list[DeadLetter] = field(default_factory=list)


def route(fetched: Iterable[Fetched], sources: dict[str, Source], partitions: int) -> Routed:
    """Validate each message and group the valid rows by the partition that owns their buyer."""
    routed = Routed()
    by_partition = routed.by_partition
    for run in fetched:
        source = sources[run.tp.topic]
        for i, value in enumerate(run.values):
            try:
                row = read_row(value, source)
            except BadRecord as bad:
                routed.dead.append(_dead_letter(run, i, bad.reason, bad.kind))
                continue
            if len(row[ORDER]) + len(row[STATUS]) > _SURELY_SMALL_CHARS:
                size = len(encode_rows([row]))
                if size > MAX_RECORD_BYTES:
                    reason = (
                        f"record too large to keep in state: {size} bytes of "
                        f"biz_order_id/pay_status/timestamps (limit {MAX_RECORD_BYTES})"
                    )
                    routed.dead.append(_dead_letter(run, i, reason, "too_large"))
                    continue
            by_partition[partition_for_buyer(row[BUYER], partitions)].append(row)
    return routed


def _dead_letter(run: Fetched, i: int, reason: str, kind: str) -> DeadLetter:
    message = run.messages[i]
    offset = message.offset()
    return DeadLetter(
        message.key(),
        run.values[i],
        run.tp.topic,
        run.tp.partition,
        -1 if offset is None else offset,
        reason,
        kind,
    )


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
        self.consumer: SourceConsumer | None = None
        # The error of the batch being sent again, until it is sent, and since when the batch
        # in hand has been going out: forwarded, then its offsets committed (health says
        # both). Meanwhile nothing polls the consumer, which learns of a lost session only
        # when polled; a commit to a coordinator gone silent waits for librdkafka's timeouts.
        self.forward_error: str | None = None
        self.batch_since: float | None = None
        self.running = False

    def health(self, now: float | None = None) -> dict[str, object]:
        """Ready while the intake runs as a member of its group and its batches go out.

        As the state stage's: one cut off from the brokers past its session timeout has lost
        its partitions, whatever it still holds, and is not ready until it has joined again.
        librdkafka says so (it revokes the assignment) only when polled, and nothing polls
        while a batch is being forwarded or committed: a batch in hand for longer than the
        session timeout counts the same. One that holds no partition as a member (more
        intakes than source partitions) is ready: it takes over when another leaves.
        """
        consumer = self.consumer
        member = self.running and consumer is not None and consumer.member
        since = self.batch_since
        in_hand = None if since is None else (time.monotonic() if now is None else now) - since
        stuck = in_hand is not None and in_hand > self.settings.session_timeout
        return {
            "ready": member and self.forward_error is None and not stuck,
            "member": member,
            "source_partitions": len(self.lag()),
            "forward_error": self.forward_error,
            "batch_s": None if in_hand is None else round(in_hand, 1),
        }

    async def run(self) -> None:
        s = self.settings
        consumer = self.consumer = SourceConsumer(
            s,
            self.sources,
            group_id=s.intake_group,
            session_timeout_ms=int(s.session_timeout * 1000),
            heartbeat_interval_ms=max(500, int(s.session_timeout * 100)),
        )
        self.running = True
        try:
            await consumer.start()
            await self._check_topics(consumer)
            while True:
                fetched = await consumer.fetch(s.intake_batch, 0.5)
                if fetched:
                    self.batch_since = time.monotonic()
                    try:
                        await self.forward_until_sent(fetched)
                        await self._commit(consumer, fetched)
                    finally:
                        self.batch_since = None
        except Exception as exc:
            refused = clients.kafka_refused(s, exc, "running the intake")
            if refused is not None:
                raise refused from exc
            raise
        finally:
            self.running = False
            await consumer.stop()

    async def forward_until_sent(self, fetched: list[Fetched]) -> None:
        """Forward a batch, again and again if Kafka refuses it: nothing is committed before.

        A re-sent batch is harmless (the state stage counts each copy once), and an intake
        that gave up would leave the worker up but reading nothing. An error that no retry
        can fix (`coupon_stream.connectors.faults`: a message too large, an unauthorized topic) is
        raised instead, so the worker stops loudly rather than loop: it cannot be one
        record's fault, since `route` bounds records and dead letters are cut to fit
        (`KafkaOut.dead_letter`), so it is the topics' or the broker's configuration.
        """

        def failed(exc: BaseException, delay: float) -> None:
            self.forward_error = repr(exc)
            metrics.INTAKE_RETRIES.inc()
            log.error("intake could not forward a batch, retrying in %.1f s: %r", delay, exc)

        try:
            await retry(
                partial(self.forward, fetched),
                backoff=Backoff(0.1, MAX_RETRY_DELAY),
                failed=failed,
            )
            self.forward_error = None
        except Exception as exc:
            log.error(
                "intake: Kafka refused a batch for good (%r); no retry can fix this, check the "
                "topics and the broker; stopping",
                exc,
            )
            raise

    async def forward(self, fetched: list[Fetched]) -> None:
        """Send one fetched batch on and wait until Kafka has acknowledged all of it."""
        for run in fetched:
            metrics.MESSAGES_CONSUMED.labels(run.tp.topic).inc(len(run.values))
        routed = route(fetched, self.sources, self.settings.partitions)
        topic = self.settings.by_buyer_topic
        sends = [
            await self.out.send(topic, value, partition=part)
            for part, rows in routed.by_partition.items()
            for value in split_rows(rows)
        ]
        for dead in routed.dead:
            sends.append(await self.out.dead_letter(dead))
        await asyncio.gather(*sends)

    async def _commit(self, consumer: SourceConsumer, fetched: list[Fetched]) -> None:
        try:
            await consumer.commit({run.tp: run.next_offset for run in fetched})
        except (CommitFailedError, KafkaError) as exc:
            if refusal(exc) is not None:
                raise  # the group's ACL: every commit would fail, never replay for ever
            # The batch is already forwarded; whoever gets these partitions replays it, and the
            # state stage counts each copy once.
            log.warning("intake commit failed, the batch will be replayed: %s", exc)

    def lag(self) -> dict[TopicPartition, int]:
        """Messages between each assigned partition's end and the committed offset."""
        consumer = self.consumer
        if consumer is None:
            return {}
        return {tp: behind(end, done) for tp, (end, done) in consumer.lag_inputs().items()}

    async def _check_topics(self, consumer: SourceConsumer) -> None:
        """Say which input topics are missing. Only a log line: the consumer reads a topic
        once it exists, and keeps trying brokers that do not answer yet."""
        try:
            topics = await consumer.topics()
        except KafkaError as exc:
            if classify(exc) is Fault.PERMANENT:
                raise
            log.warning(
                "intake could not list the topics yet (%s); it reads them once the brokers answer",
                exc,
            )
            return
        for topic in self.sources:
            if topic not in topics:
                log.error(
                    "input topic %s does not exist; this worker reads it as soon as it is "
                    "created (coupon-stream topics)",
                    topic,
                )
