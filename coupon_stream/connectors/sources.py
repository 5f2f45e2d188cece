"""The intake's consumer of the source topics: librdkafka (confluent-kafka) under asyncio.

Why not aiokafka, as everywhere else: aiokafka parses fetches and builds a Python record
object per message in the worker's own thread, one of the largest costs per event left
(docs/performance.md, "The intake's consumer"). librdkafka fetches and parses in threads of
its own and hands a fetch over as C message objects.

librdkafka's Python consumer takes one caller at a time, and its calls that wait (for a
message, for the broker) run on a thread of this consumer's own, one at a time; taking what
librdkafka has fetched already runs on the event loop's thread, since handing it over to
another thread costs more than that (the lag gauge reads figures kept here).
Partitions move only inside `fetch` and `stop` (librdkafka runs the rebalance callbacks
within those calls): never while the intake forwards or commits a batch it fetched, so that
batch is sent and committed first.

Errors are aiokafka's error classes once they leave here (`faults.from_librdkafka`), so
that the intake, `faults.classify` and `clients.kafka_refused` see one vocabulary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException
from confluent_kafka import KafkaError as LibrdkafkaError
from confluent_kafka import TopicPartition as _Partition

from coupon_stream.connectors import clients
from coupon_stream.connectors.clients import TopicPartition
from coupon_stream.connectors.faults import Fault, KafkaError, classify, from_librdkafka
from coupon_stream.foundation.settings import Settings

log = logging.getLogger(__name__)

FETCH_MIN_BYTES = 64 * 1024
FETCH_MAX_WAIT_MS = 20


class SourceMessage(Protocol):
    """Where one fetched message came from: what a dead letter must say of it."""

    def key(self) -> bytes | None: ...
    def offset(self) -> int | None: ...


@dataclass(slots=True)
class Fetched:
    """One partition's messages in a fetch, in order: their values, and the messages."""

    tp: TopicPartition
    values: list[bytes | None]
    messages: list[SourceMessage]  # values[i] is messages[i]'s value
    next_offset: int  # the offset to commit once all of them are forwarded


class SourceConsumer:
    """A group member reading the source topics a fetch at a time, committing what it says.

    It keeps what the lag gauge needs (its assignment, each partition's committed offset and
    high water) up to date itself, since it cannot be asked while a fetch waits.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Iterable[str],
        *,
        group_id: str,
        session_timeout_ms: int,
        heartbeat_interval_ms: int,
    ) -> None:
        self.subscribed = list(topics)
        self.group_id = group_id
        self._conf: dict[str, Any] = {
            "bootstrap.servers": settings.bootstrap_servers,
            **clients.librdkafka_auth(settings),
            "group.id": group_id,
            "client.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": heartbeat_interval_ms,
            # aiokafka's default assignor: members of both clients can share the group
            # during a rolling upgrade.
            "partition.assignment.strategy": "roundrobin",
            "max.partition.fetch.bytes": 4 * 1024 * 1024,
            "fetch.max.bytes": 16 * 1024 * 1024,
            # librdkafka fetches again as soon as a fetch returns: with fetch.min.bytes=1 the
            # broker answers a stream of tiny fetches while input trickles in, and the CPU it
            # spends on them is taken from the worker, which raised produce-to-visible
            # latency (docs/performance.md, "The intake's consumer"). A fetch waits for
            # FETCH_MIN_BYTES or FETCH_MAX_WAIT_MS, whichever comes first.
            "fetch.min.bytes": FETCH_MIN_BYTES,
            "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,
            # Records of aborted transactions never count.
            "isolation.level": "read_committed",
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            "error_cb": self._on_error,
        }
        self._consumer: Consumer | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{group_id}-consumer")
        self._errors: list[KafkaError] = []
        self._lock = threading.Lock()  # the fields below: written by either thread
        self._committed: dict[TopicPartition, int | None] = {}
        self._highwater: dict[TopicPartition, int] = {}
        # A member of its group: assigned (partitions or none) and not revoked since. librdkafka
        # revokes the assignment when the session times out (brokers gone, or a freeze).
        self.member = False
        self._look_up: list[_Partition] = []  # assigned partitions whose commits are unknown

    async def _call(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(call, *args, **kwargs))

    async def start(self) -> None:
        def start() -> None:
            consumer = Consumer(self._conf)
            consumer.subscribe(
                self.subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            self._consumer = consumer

        await self._call(start)

    async def fetch(self, max_records: int, timeout: float) -> list[Fetched]:
        """What the next fetch holds, by partition (empty after `timeout` s with nothing).

        Raises the first error no retry can fix (an ACL, a refused login); logs the others,
        which librdkafka retries on its own.
        """
        # What librdkafka's threads have fetched already is taken on the event loop's thread:
        # a hand-over to the consumer's thread costs more than it. Only waiting goes there.
        messages = self._consume(max_records, 0)
        if not messages:
            messages = await self._call(self._consume, max_records, timeout)
        if self._look_up:
            parts, self._look_up = self._look_up, []
            await self._call(self._look_up_committed, parts)
        fetched: list[Fetched] = []
        run: Fetched | None = None
        topic, partition = "", -1
        for m in messages:
            err = m.error()
            if err is not None:  # about the group or one of its topics: name which
                denied = err.code() == LibrdkafkaError.GROUP_AUTHORIZATION_FAILED
                self._report(from_librdkafka(err, self.group_id if denied else m.topic()))
                continue
            p, t = m.partition(), m.topic()
            if run is None or p != partition or t != topic:
                if run is not None:
                    fetched.append(run)
                topic, partition = t, p
                run = Fetched(TopicPartition(t, p), [], [], 0)
            run.values.append(m.value())
            run.messages.append(m)
        if run is not None:
            fetched.append(run)
        for f in fetched:
            f.next_offset = (f.messages[-1].offset() or 0) + 1
        return fetched

    def _consume(self, max_records: int, timeout: float) -> list[Any]:
        consumer = self._held()
        try:
            # consume() waits until it has max_records or the timeout is over: wait for the
            # first message only, then take what has arrived with it.
            if timeout:
                first = consumer.poll(timeout)
                messages: list[Any] = [] if first is None else [first]
                if first is not None and max_records > 1:
                    messages += consumer.consume(max_records - 1, 0)
            else:
                messages = consumer.consume(max_records, 0)
        except KafkaException as exc:
            raise from_librdkafka(exc.args[0]) from exc
        highwater = {}
        for tp in self._committed:
            part = _Partition(tp.topic, tp.partition)
            _, high = consumer.get_watermark_offsets(part, cached=True)
            if high is not None and high >= 0:
                highwater[tp] = high
        with self._lock:
            self._highwater.update(highwater)
        errors, self._errors = self._errors, []
        for error in errors:
            self._report(error)
        return messages

    def _report(self, error: KafkaError) -> None:
        if classify(error) is Fault.PERMANENT:
            raise error
        log.warning("%s: Kafka: %s (librdkafka retries it)", self.group_id, error)

    def _on_error(self, err: Any) -> None:
        # Called by librdkafka within `consume` or `poll`, on the thread that called them.
        self._errors.append(from_librdkafka(err))

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit the next offset to read of each partition; raises as aiokafka would."""
        await self._call(self._commit, dict(offsets))

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        parts = [_Partition(tp.topic, tp.partition, o) for tp, o in offsets.items()]
        try:
            done = self._held().commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            raise from_librdkafka(exc.args[0], self.group_id) from exc
        for part in done or ():
            if part.error is not None:
                raise from_librdkafka(part.error, self.group_id)
        with self._lock:
            for tp, o in offsets.items():
                if tp in self._committed:
                    self._committed[tp] = o

    def _on_assign(self, consumer: Consumer, parts: list[_Partition]) -> None:
        assigned = [TopicPartition(p.topic, p.partition) for p in parts]
        with self._lock:
            self._committed = dict.fromkeys(assigned)
            self._highwater = {}
        self.member = True
        self._look_up = parts  # by the next `fetch`: a callback must not wait on the broker
        mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        log.info("%s assigned %d partitions: %s", self.group_id, len(mine), ", ".join(mine))

    def _look_up_committed(self, parts: list[_Partition]) -> None:
        try:
            found = self._held().committed(parts, timeout=5)
        except KafkaException as exc:
            # Only the lag gauge needs them: it counts from the log's start until a commit.
            log.warning("%s could not read its committed offsets: %s", self.group_id, exc)
            return
        with self._lock:
            for p in found:
                tp = TopicPartition(p.topic, p.partition)
                if p.error is None and p.offset >= 0 and tp in self._committed:
                    if self._committed[tp] is None:  # else a commit of ours came first
                        self._committed[tp] = p.offset

    def _on_revoke(self, consumer: Consumer, parts: list[_Partition]) -> None:
        self.member = False
        self._look_up = []
        with self._lock:
            self._committed = {}
            self._highwater = {}

    def lag_inputs(self) -> dict[TopicPartition, tuple[int, int | None]]:
        """(high water, committed offset) of each assigned partition whose end is known."""
        with self._lock:
            return {
                tp: (end, self._committed.get(tp))
                for tp, end in self._highwater.items()
                if tp in self._committed
            }

    async def topics(self) -> set[str]:
        def list_topics() -> set[str]:
            try:
                return set(self._held().list_topics(timeout=10).topics)
            except KafkaException as exc:
                raise from_librdkafka(exc.args[0]) from exc

        topics: set[str] = await self._call(list_topics)
        return topics

    def _held(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the source consumer is not started")
        return self._consumer

    async def stop(self) -> None:
        """Leave the group (after any fetch still running on the consumer's thread)."""

        def close() -> None:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

        try:
            await asyncio.shield(self._call(close))
        finally:
            self._thread.shutdown(wait=False)
