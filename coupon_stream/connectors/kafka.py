"""What a worker writes to Kafka: by-buyer batches, state changelog batches, dead letters.

One aiokafka producer per worker, shared by intake and the state stage. Sends return the
delivery future; callers wait for it before committing or acknowledging what caused it.
Also what the operator's tools ask of Kafka's admin side: topics created, a group's offsets
committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin import NewTopic as NewTopic
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced, TopicAlreadyExistsError, for_code
from aiokafka.structs import OffsetAndMetadata

from coupon_stream.connectors import clients
from coupon_stream.connectors.faults import Backoff, is_too_large, retry
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import Fenced, NotHeld
from coupon_stream.foundation.settings import Settings

if TYPE_CHECKING:
    from coupon_stream.core.state import ResultRow

log = logging.getLogger(__name__)

HEADER_TOPIC = "coupon.source.topic"
HEADER_PARTITION = "coupon.source.partition"
HEADER_OFFSET = "coupon.source.offset"
HEADER_REASON = "coupon.error.reason"
HEADER_VALUE_TRUNCATED = "coupon.value.truncated"  # the original value's length
HEADER_KEY_TRUNCATED = "coupon.key.truncated"  # the original key's length
# What is left of a dead letter Kafka refused as too large: far below any broker's limit.
TRUNCATED_VALUE_BYTES = 64 * 1024
TRUNCATED_KEY_BYTES = 1024
TRUNCATED_REASON_CHARS = 4096
SINK_REJECTED = "sink_rejected"


def behind(end: int, done: int | None) -> int:
    """Consumer lag: messages between a partition's end and the next offset to process.

    The one definition for the lag gauge, the stall check and `coupon-stream status`;
    nothing committed means the group starts at the log's beginning.
    """
    return max(0, end - (done or 0))


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


def row_dead_letter(
    table: str,
    row: ResultRow | None,
    reason: str,
    *,
    key: tuple[int, int] | None = None,
) -> DeadLetter:
    """The dead letter of a result row the database rejected: the row as a JSON object.

    Its source "topic" is the result table, with partition and offset -1 (no Kafka
    message caused it alone). A rejected delete (`row` None) is written as `"deleted": true`
    with the (buyer_id, effect_time) of `key`, so pass the key along with a None row.
    """
    if row is not None:
        value = orjson.dumps(row._asdict())
    else:
        deleted: dict[str, object] = {"deleted": True}
        if key is not None:
            deleted = {"buyer_id": key[0], "effect_time": key[1], **deleted}
        value = orjson.dumps(deleted)
    return DeadLetter(None, value, table, -1, -1, reason, SINK_REJECTED)


def truncated(dead: DeadLetter) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of `dead` cut to sizes any broker takes, the cuts in headers."""
    key, value = dead.key, dead.value
    headers = [
        (h, v if h != HEADER_REASON else dead.reason[:TRUNCATED_REASON_CHARS].encode())
        for h, v in dead.headers()
    ]
    if value is not None and len(value) > TRUNCATED_VALUE_BYTES:
        headers.append((HEADER_VALUE_TRUNCATED, str(len(value)).encode()))
        value = value[:TRUNCATED_VALUE_BYTES]
    if key is not None and len(key) > TRUNCATED_KEY_BYTES:
        headers.append((HEADER_KEY_TRUNCATED, str(len(key)).encode()))
        key = key[:TRUNCATED_KEY_BYTES]
    return key, value, headers


class KafkaOut:
    """The worker's producer: started once, stopped after everything in flight is delivered."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def producer(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = clients.producer(
                    self.settings,
                    acks="all",
                    linger_ms=5,
                    max_batch_size=256 * 1024,
                    client_id=f"{self.settings.app_id}-out",
                )
                await producer.start()
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.flush()
            await self._producer.stop()
            self._producer = None

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        producer = await self.producer()
        sent: asyncio.Future[Any] = await producer.send(
            topic, value, key=key, partition=partition, headers=headers
        )
        return sent

    async def dead_letter(self, dead: DeadLetter) -> asyncio.Future[Any]:
        """Send a dead letter; the returned future resolves once Kafka has acknowledged it.

        A dead letter Kafka refuses as too large (a source message near the 1 MiB limit
        plus our headers, or a topic with a lower limit) is sent again with its value cut
        to 64 KiB and its original length in a `coupon.value.truncated` header: the cut
        copy still says where the message is and why it was refused, whereas retrying the
        whole one would block its batch forever.
        """
        metrics.DEAD_LETTERS.labels(dead.kind).inc()
        log.warning(
            "dead letter: %s[%d]@%d: %s", dead.topic, dead.partition, dead.offset, dead.reason
        )
        try:
            sent = await self.send(
                self.settings.dlq_topic, dead.value, key=dead.key, headers=dead.headers()
            )
        except Exception as exc:
            if not is_too_large(exc):
                raise
            return await self._send_truncated(dead, exc)  # refused by the client's size check
        return asyncio.ensure_future(self._delivered(dead, sent))

    async def _delivered(self, dead: DeadLetter, sent: asyncio.Future[Any]) -> Any:
        try:
            return await sent
        except Exception as exc:
            if not is_too_large(exc):
                raise
            return await (await self._send_truncated(dead, exc))  # refused by the broker

    async def _send_truncated(self, dead: DeadLetter, exc: BaseException) -> asyncio.Future[Any]:
        key, value, headers = truncated(dead)
        metrics.DEAD_LETTERS_TRUNCATED.inc()
        log.error(
            "dead letter of %s[%d]@%d refused as too large (%d bytes of value): %r; sent "
            "again with the value cut to %d bytes",
            dead.topic,
            dead.partition,
            dead.offset,
            len(dead.value or b""),
            exc,
            TRUNCATED_VALUE_BYTES,
        )
        return await self.send(self.settings.dlq_topic, value, key=key, headers=headers)

    async def send_records(
        self, topic: str, partition: int, records: Iterable[tuple[bytes, bytes | None]]
    ) -> list[tuple[asyncio.Future[Any], int]]:
        """`send_batches` on the worker's producer (not transactional: tools and benches)."""
        return await send_batches(await self.producer(), topic, partition, records)


async def send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    records: Iterable[tuple[bytes, bytes | None]],
) -> list[tuple[asyncio.Future[Any], int]]:
    """Send keyed records to one partition as few record batches (one append each).

    Returns each batch's delivery future (its metadata carries the batch's first
    offset) with the number of records in it. A per-message `send` runs the producer's
    Python path once per record; a record batch runs it once per batch.
    """
    sent = []
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            n = batch.record_count()
            sent.append((await producer.send_batch(batch, topic, partition=partition), n))
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    if batch.record_count():
        n = batch.record_count()
        sent.append((await producer.send_batch(batch, topic, partition=partition), n))
    return sent


async def last_offset(sent: list[tuple[asyncio.Future[Any], int]]) -> int:
    """Once Kafka has every batch of `send_batches`: the offset of the last record (-1: none)."""
    last = -1
    metas = await asyncio.gather(*(f for f, _ in sent))
    for meta, (_, n) in zip(metas, sent, strict=True):
        last = max(last, meta.offset + n - 1)
    return last


# How long one changelog transaction may take before it counts as failed.
TRANSACTION_SECONDS = 30.0


class ChangelogWriter:
    """Appends to the state changelogs: one transactional producer per owned partition.

    Partition p of every changelog is written under the transactional id
    `<app_id>-changelog-p` only, whichever worker owns it. `claim` starts that id's producer:
    the broker then fences the previous owner's producer (its epoch is older) and aborts its
    open transaction (KIP-98), so no append of the previous owner lands after the claim.
    Readers read committed records only (`clients`, the Faust consumer in `engine`).
    A producer is started only by `claim`, never again by a failed append: a worker cut
    off from the brokers must not take a partition back from its new owner on its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._open: set[int] = set()  # partitions whose transaction has begun, not ended

    def transactional_id(self, partition: int) -> str:
        return f"{self.settings.app_id}-changelog-{partition}"

    def holds(self, partition: int) -> bool:
        return partition in self._producers

    async def claim(self, partition: int) -> None:
        """Take partition `partition`'s changelogs over: older owners' appends are fenced."""
        await self.release(partition)
        producer = clients.producer(
            self.settings,
            transactional_id=self.transactional_id(partition),
            acks="all",
            linger_ms=0,
            max_batch_size=256 * 1024,
            client_id=f"{self.settings.app_id}-changelog-{partition}",
        )
        try:
            async with asyncio.timeout(TRANSACTION_SECONDS):
                await producer.start()
                # Returns once InitProducerId is answered: the broker has bumped the id's
                # epoch and ended the older producer's open transaction. (An empty
                # transaction is aborted without a request.)
                await producer.begin_transaction()
                await producer.abort_transaction()
        except BaseException:
            async with asyncio.timeout(TRANSACTION_SECONDS):
                await producer.stop()
            raise
        self._producers[partition] = producer

    async def append(
        self, partition: int, records: Mapping[str, Mapping[bytes, bytes | None]]
    ) -> dict[str, int]:
        """Append each topic's records to its partition `partition`, in one transaction.

        Returns the last offset written per topic. Raises `Fenced` if a newer owner claimed
        the partition, and `NotHeld` if the producer is not usable any more (a failure
        that left its transaction neither committed nor aborted): in both cases nothing of
        the transaction is visible to readers, and the partition must be claimed again.
        Any other error comes once the transaction is aborted: the same producer may try
        again.
        """
        producer = self._producers.get(partition)
        if producer is None:
            raise NotHeld(partition, "its changelogs are not claimed by this worker")
        try:
            async with asyncio.timeout(TRANSACTION_SECONDS):
                if partition in self._open:  # an append cancelled midway left it open
                    await producer.abort_transaction()
                    self._open.discard(partition)
                await producer.begin_transaction()
                self._open.add(partition)
                sent = {
                    topic: await send_batches(producer, topic, partition, items.items())
                    for topic, items in records.items()
                }
                last = {topic: await last_offset(batches) for topic, batches in sent.items()}
                await producer.commit_transaction()
                self._open.discard(partition)
            return last
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            await self.release(partition)
            raise Fenced(partition, "its changelogs") from exc
        except Exception as exc:
            if partition in self._open:
                await self._abort(partition, producer, exc)
            raise  # aborted: the same producer may try again

    async def _abort(self, partition: int, producer: AIOKafkaProducer, cause: Exception) -> None:
        """Abort a failed transaction; if that fails too, the producer is unusable."""
        try:
            async with asyncio.timeout(TRANSACTION_SECONDS):
                await producer.abort_transaction()
            self._open.discard(partition)
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            await self.release(partition)
            raise Fenced(partition, "its changelogs") from exc
        except Exception as exc:  # noqa: BLE001 - any failure leaves the producer unusable
            await self.release(partition)
            raise NotHeld(
                partition, f"its changelog transaction failed ({cause!r}) and was not aborted"
            ) from exc

    async def release(self, partition: int | None = None) -> None:
        """Stop the producer of `partition` (None: of every partition), e.g. on revocation."""
        for p in list(self._producers) if partition is None else [partition]:
            producer = self._producers.pop(p, None)
            self._open.discard(p)
            if producer is not None:
                try:
                    async with asyncio.timeout(TRANSACTION_SECONDS):
                        await producer.stop()
                except Exception as exc:  # noqa: BLE001 - it is gone either way
                    log.info("changelog producer of partition %d stopped with %r", p, exc)


class PartitionReader:
    """Reads offset ranges of partitions directly, outside any consumer group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> AIOKafkaConsumer:
        """Connect now (idempotent), so a later read does not pay for the bootstrap.

        Kept only once started: a start that failed (broker down) is tried again by the
        next call, and concurrent callers wait for one start.
        """
        async with self._starting:
            if self._consumer is None:
                consumer = clients.consumer(
                    self.settings,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",  # a start the log no longer holds: its first
                    max_partition_fetch_bytes=4 * 1024 * 1024,
                    fetch_max_bytes=16 * 1024 * 1024,
                    # The ranges read here exist: a partition read to its end, still
                    # assigned, would hold up the next range's first fetch this long.
                    fetch_max_wait_ms=50,
                    # Changelogs are written in transactions: a fenced owner's aborted
                    # records must never be restored, and ends are the last stable offsets.
                    isolation_level="read_committed",
                )
                try:
                    await consumer.start()
                except BaseException:
                    await consumer.stop()
                    raise
                self._consumer = consumer
            return self._consumer

    async def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        consumer = await self.start()
        tps = [TopicPartition(topic, p) for p in partitions]
        return {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}

    async def batches(
        self, topic: str, ranges: Mapping[int, tuple[int, int]]
    ) -> AsyncGenerator[tuple[int, list[Any], int]]:
        """Yield (partition, records, next offset) until each [start, end) range is read.

        Records at or past a range's end are left out; offsets the log no longer holds
        (compacted or deleted) are skipped.
        """
        consumer = await self.start()
        left = {TopicPartition(topic, p): end for p, (start, end) in ranges.items() if start < end}
        consumer.assign(list(left))
        for tp in left:
            consumer.seek(tp, ranges[tp.partition][0])
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=1000)
            for tp in list(left):
                end = left[tp]
                records = [r for r in fetched.get(tp, ()) if r.offset < end]
                position = min(await consumer.position(tp), end)
                if position >= end:
                    del left[tp]
                if records or position >= end:
                    yield tp.partition, records, position

    async def records(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[bytes | None, bytes | None]]:
        """(key, value) of every record in [start, end) the log still holds."""
        found: list[tuple[bytes | None, bytes | None]] = []
        async for _, batch, _ in self.batches(topic, {partition: (start, end)}):
            found += [(r.key, r.value) for r in batch]
        return found

    async def read(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[int, bytes, int]]:
        """(offset, value, timestamp in ms) of every record in [start, end) the log still holds."""
        records: list[tuple[int, bytes, int]] = []
        async for _, batch, _ in self.batches(topic, {partition: (start, end)}):
            records += [(r.offset, r.value, r.timestamp) for r in batch]
        return records

    async def committed(self, group: str, topic: str, partition: int) -> int | None:
        """The offset `group` has committed for a partition, from the broker itself."""
        admin = self._admin
        if admin is None:
            admin = clients.admin(self.settings)
            await admin.start()
            self._admin = admin
        tp = TopicPartition(topic, partition)
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
        meta = offsets.get(tp)
        return None if meta is None or meta.offset < 0 else meta.offset

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


# -- the operator's requests (`coupon-stream topics`, `rescale`) ---------------------------


async def create_topics(settings: Settings, topics: list[NewTopic]) -> list[str]:
    """Create `topics` (NewTopic: name, partitions, replication factor, configs); return the
    names created, those that exist already left as they are.

    The request is retried for a minute (a fresh cluster's missing controller), not an
    outage for ever; a topic the broker refuses raises its Kafka error, classified like any
    other (`coupon_stream.connectors.faults`).
    """
    admin = clients.admin(settings)
    await admin.start()
    created = []
    try:
        response = await retry(
            lambda: admin.create_topics(topics), timeout=60.0, backoff=Backoff(0.2, 1.0)
        )
        for topic, code, *_ in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TopicAlreadyExistsError.errno:
                raise for_code(code)(topic)  # classified like any Kafka error
    finally:
        await admin.close()
    return created


async def commit_offsets(
    settings: Settings, group: str, offsets: Mapping[TopicPartition, int]
) -> None:
    """Commit `offsets` (the next offset to read, per partition) as `group`'s, outside any
    rebalance: the group must have no member."""
    consumer = clients.consumer(settings, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()
