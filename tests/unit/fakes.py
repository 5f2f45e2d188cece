"""The unit tests' one set of fakes for the worker's transports: Kafka out, the sink, reads.

They stand in for `KafkaOut` (and aiokafka's producer under a real one), `ResultSink`,
`PartitionReader`, the consumers (Faust's consumer thread, the intake's consumer) and the
changelogs a restore or a rescale reads, never for the code under test. Each records what
it was given, and can fail in the ways the real one does.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from confluent_kafka import KafkaException
from faust.types import TP

from coupon_stream.connectors.mysql import WriteResult
from coupon_stream.connectors.sources import Fetched
from coupon_stream.core.state import ResultRow
from coupon_stream.core.stored import day_key
from coupon_stream.foundation.errors import Fenced, NotHeld

if TYPE_CHECKING:  # each fake is typed as what it stands in for: mypy holds it to its signatures
    from coupon_stream.connectors.kafka import ChangelogWriter as _ChangelogWriter
    from coupon_stream.connectors.kafka import KafkaOut as _KafkaOut
    from coupon_stream.connectors.kafka import PartitionReader as _PartitionReader
    from coupon_stream.connectors.mysql import ResultSink as _ResultSink
else:
    _ChangelogWriter = _KafkaOut = _PartitionReader = _ResultSink = object


class Crash(BaseException):
    """The worker died here (a BaseException: nothing in the service catches it)."""


class Meta:
    """What a delivery future resolves to: the (first) offset written."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


def done(value: object = None, exc: BaseException | None = None) -> asyncio.Future[Any]:
    fut = asyncio.get_running_loop().create_future()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
    return fut


class FakeOut(_KafkaOut):
    """`KafkaOut`: sends as (topic, {"value", key, partition, headers}), changelogs as lists.

    `refuse` makes every send raise it; `refuse_next` makes the next changelog append raise
    (aiokafka could not queue it in time); `fail_next` fails the next append after it was
    sent; `crash_after` kills the worker after that many more changelog records.
    """

    def __init__(self, refuse: BaseException | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.attempts = 0
        self.refuse = refuse
        self.logs: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = defaultdict(list)
        self.refuse_next = False
        self.fail_next = False
        self.crash_after: int | None = None
        self.txn_epochs: dict[int, int] = {}  # the broker's, per changelog partition

    async def send(self, topic: str, value: bytes | None, **kw: Any) -> asyncio.Future[Any]:
        self.attempts += 1
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((topic, {"value": value, **kw}))
        return done(Meta(len(self.sent)))

    async def dead_letter(self, dead: Any) -> asyncio.Future[Any]:
        return await self.send("dlq", dead.value, key=dead.key, headers=dead.headers())

    def dead(self) -> list[dict[str, Any]]:
        return [kw for topic, kw in self.sent if topic == "dlq"]

    def writer(self) -> FakeChangelogs:
        """One worker's `ChangelogWriter` onto these changelogs."""
        return FakeChangelogs(self)


class FakeProducer:
    """aiokafka's producer as far as KafkaOut uses it: `send` raises MessageSizeTooLargeError
    itself above `client_limit` (max_request_size), and returns a future failing with it above
    `broker_limit` (the topic's max.message.bytes); `refuse` fails every send's future."""

    def __init__(
        self,
        client_limit: int = 1024 * 1024,
        broker_limit: int = 1024 * 1024,
        refuse: BaseException | None = None,
    ) -> None:
        self.client_limit, self.broker_limit = client_limit, broker_limit
        self.refuse = refuse
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]] = []

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        if self.refuse is not None:
            return done(exc=self.refuse)
        size = len(value or b"") + len(key or b"") + sum(len(h) + len(v) for h, v in headers or [])
        if size > self.client_limit:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        if size > self.broker_limit:
            return done(exc=MessageSizeTooLargeError())
        self.sent.append((topic, value, key, dict(headers or [])))
        return done(len(self.sent))


class FakeChangelogs(_ChangelogWriter):
    """`ChangelogWriter`: transactions onto a `FakeOut`'s logs, fenced like the broker fences.

    `FakeOut.txn_epochs` is the broker's epoch per transactional id (partition); a claim
    raises it, and an append of a producer holding an older one raises `Fenced`. A
    transaction's records become visible (readers read committed) only at its commit, so a
    crash (`FakeOut.crash_after`) or a failure in the middle leaves none of them.
    """

    def __init__(self, out: FakeOut) -> None:
        self.out = out
        self.held: dict[int, int] = {}
        self.claims = 0

    def holds(self, partition: int) -> bool:
        return partition in self.held

    async def claim(self, partition: int) -> None:
        self.claims += 1
        epoch = self.out.txn_epochs[partition] = self.out.txn_epochs.get(partition, 0) + 1
        self.held[partition] = epoch

    async def release(self, partition: int | None = None) -> None:
        for p in list(self.held) if partition is None else [partition]:
            self.held.pop(p, None)

    async def append(self, partition: int, records: Any) -> dict[str, int]:
        out = self.out
        if partition not in self.held:
            raise NotHeld(partition, "not claimed")
        if self.held[partition] != out.txn_epochs.get(partition):
            del self.held[partition]
            raise Fenced(partition, "its changelogs")
        if out.refuse_next or out.fail_next:
            out.refuse_next = out.fail_next = False
            raise KafkaTimeoutError()  # aborted: the same producer may try again
        pending: dict[str, list[tuple[bytes, bytes | None]]] = {}
        for topic, items in records.items():
            for record in items.items():
                if out.crash_after is not None:
                    if out.crash_after <= 0:
                        raise Crash()
                    out.crash_after -= 1
                pending.setdefault(topic, []).append(record)
        last = {}
        for topic, written in pending.items():
            log = out.logs[(topic, partition)]
            log.extend(written)
            last[topic] = len(log) - 1
        return last


class FakeSink(_ResultSink):
    """`ResultSink`: the table as a dict of (buyer_id, effect_time) -> row, and its fence.

    `fence` holds each partition's epoch; `write` refuses, writing nothing, rows whose
    epochs are not the fence's (as the real sink's transaction does).
    """

    def __init__(self) -> None:
        # The rows; the real sink's `table` is its SQLAlchemy Table.
        self.table: dict[tuple[int, int], ResultRow] = {}  # type: ignore[assignment]
        # The grants table: (buyer_id, effect_time) -> (tier, coupon_amount, policy_version).
        self.granted: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.writes = 0
        self._crash: tuple[int, str] | None = None
        self.fence: dict[int, int] = {}

    async def start(self) -> None:
        pass

    async def ping(self, timeout: float = 2.0) -> bool:
        return True

    async def claim(self, partition: int) -> int:
        epoch = self.fence[partition] = self.fence.get(partition, 0) + 1
        return epoch

    async def epoch(self, partition: int) -> int | None:
        return self.fence.get(partition)

    async def write(
        self, rows: Any, still_wanted: Any = None, epochs: Any = None, grants: Any = None
    ) -> WriteResult:
        for partition, epoch in (epochs or {}).items():
            if self.fence.get(partition) != epoch:
                raise Fenced(partition, "its result rows", self.fence.get(partition))
        crash = self._crash_now()
        if crash == "before":
            raise Crash()
        self.writes += 1
        for key, row in rows.items():
            if row is None:
                self.table.pop(key, None)
            else:
                self.table[key] = row
        for key, grant in (grants or {}).items():
            if grant.tier:
                self.granted[key] = (grant.tier, grant.coupon_amount, grant.policy_version)
            else:
                self.granted.pop(key, None)
        if crash == "after":
            raise Crash()  # written, never committed: the replay writes it again
        return WriteResult(True)

    def crash_at(self, writes: int, after: bool) -> None:
        """Kill the worker at its `writes`-th next write, before or after it lands."""
        self._crash = (writes, "after" if after else "before")

    def _crash_now(self) -> str | None:
        if self._crash is None:
            return None
        left, when = self._crash
        self._crash = None if left <= 0 else (left - 1, when)
        return when if left <= 0 else None

    def rows(self) -> set[tuple[Any, ...]]:
        return {tuple(r) for r in self.table.values()}


class DownSink(FakeSink):
    """A database that is down: every attempt fails until the write is no longer wanted."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.attempting = asyncio.Event()

    async def write(
        self, rows: Any, still_wanted: Any = None, epochs: Any = None, grants: Any = None
    ) -> WriteResult:
        while still_wanted is None or still_wanted():
            self.attempts += 1
            self.attempting.set()
            await asyncio.sleep(0.01)
        return WriteResult(False)


class MemoryGroup:
    """Faust's Kafka transport for one consumer group, in memory (kstreams' test client idea).

    Installed under Faust's real consumer (`installed`), it replaces only the aiokafka thread
    that talks to the broker: Faust's commit, acknowledgement and release code runs as in
    production (`_commit_offsets` and its partial-commit rule, the unacked set, the
    consumer's committed view), and the offsets land here instead of in Kafka.
    """

    def __init__(self, topic: str, partitions: int) -> None:
        self.topic = topic
        self.assigned = {TP(topic, p) for p in range(partitions)}
        self.offsets: dict[TP, int] = {}
        self.commits = 0

    @classmethod
    @contextmanager
    def installed(cls, app: Any, topic: str, partitions: int) -> Iterator[MemoryGroup]:
        """The group under `app`'s consumer for the duration, then Faust's own thread again
        (as kstreams' `TestStreamClient.stop()` puts back what it replaced). The one place
        the tests reach inside Faust."""
        group = cls(topic, partitions)
        consumer = app.consumer
        thread = consumer._thread
        consumer._thread = group
        try:
            yield group
        finally:
            consumer._thread = thread

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TP, int]) -> bool:
        self.commits += 1
        self.offsets.update(offsets)
        return True

    def highwater(self, tp: TP) -> int | None:
        return None

    def committed(self) -> dict[int, int]:
        """What Kafka holds for the group: partition -> next offset to read."""
        return {tp.partition: o for tp, o in self.offsets.items() if tp.topic == self.topic}

    async def read(self, group: str, topic: str, partition: int) -> int | None:
        """The group's committed offset as a `PartitionReader.committed` would read it."""
        return self.offsets.get(TP(topic, partition))


class LogReader(_PartitionReader):
    """`PartitionReader` as the state stage uses it: the by-buyer log read back, and the
    group's committed offset.

    `log` maps (partition, offset) -> value, read back with `received_ms` as its timestamp;
    `reads` lists the (partition, start, end) ranges asked for. The committed offset is the
    `group`'s (a `MemoryGroup`, under a worker's app) or else `offsets`' (partition -> next
    offset, none while 0).
    """

    def __init__(self, received_ms: int | None = None) -> None:
        self.log: dict[tuple[int, int], bytes] = {}
        self.reads: list[tuple[int, int, int]] = []
        self.received_ms = received_ms
        self.group: MemoryGroup | None = None
        self.offsets: dict[int, int] = {}
        # Changelogs as a `FakeOut` holds them ((topic, partition) -> records), if any.
        self.changelogs: Mapping[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}

    async def committed(self, group: str, topic: str, partition: int) -> int | None:
        if self.group is not None:
            return await self.group.read(group, topic, partition)
        return self.offsets.get(partition) or None

    async def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        return {p: len(self.changelogs.get((topic, p), ())) for p in partitions}

    async def records(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[bytes | None, bytes | None]]:
        return list(self.changelogs.get((topic, partition), [])[start:end])

    async def read(  # type: ignore[override]  # a None time: unknown, as `add` takes it
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[int, bytes, int | None]]:
        self.reads.append((partition, start, end))
        return [
            (o, self.log[(partition, o)], self.received_ms)
            for o in range(start, end)
            if (partition, o) in self.log
        ]

    async def stop(self) -> None:
        pass


class Polled:
    """A source message as the intake's consumer fetches it (`connectors.sources`)."""

    def __init__(
        self, topic: str, offset: int, value: bytes, partition: int = 0, key: bytes = b"k"
    ) -> None:
        self.topic, self.partition = topic, partition
        self.value: bytes | None = value
        self._offset, self._key = offset, key

    def key(self) -> bytes | None:
        return self._key

    def offset(self) -> int | None:
        return self._offset


def fetched(*messages: Polled) -> list[Fetched]:
    """`messages` as `SourceConsumer.fetch` returns them: runs of one partition each."""
    runs: list[Fetched] = []
    for m in messages:
        tp = TopicPartition(m.topic, m.partition)
        if not runs or runs[-1].tp != tp:
            runs.append(Fetched(tp, [], [], 0))
        runs[-1].values.append(m.value)
        runs[-1].messages.append(m)
        runs[-1].next_offset = m._offset + 1
    return runs


class FakeLibrdkafka:
    """librdkafka's consumer as `SourceConsumer` asks it between fetches: the committed
    offsets (-1001: none) and the high water it cached for each partition."""

    def __init__(self, committed: dict[tuple[str, int], int], highwater: int) -> None:
        self.offsets = committed
        self.end = highwater
        self.fetched: list[Any] = []  # what librdkafka has fetched already (`FakeMessage`s)
        self.topics: dict[str, Any] = {}  # what a metadata request lists
        self.metadata_error: Any = None  # a librdkafka KafkaError it raises instead

    def list_topics(self, timeout: float) -> Any:
        if self.metadata_error is not None:
            raise KafkaException(self.metadata_error)
        return SimpleNamespace(topics=self.topics)

    def committed(self, parts: list[Any], timeout: float) -> list[Any]:
        return [type(p)(p.topic, p.partition, self.offsets[p.topic, p.partition]) for p in parts]

    def poll(self, timeout: float) -> Any:
        return None  # nothing more arrives within `timeout`

    def consume(self, max_records: int, timeout: float) -> list[Any]:
        taken, self.fetched = self.fetched[:max_records], self.fetched[max_records:]
        return taken

    def get_watermark_offsets(self, part: Any, cached: bool) -> tuple[int, int]:
        assert cached  # never a request while a fetch may be waiting
        return 0, self.end


class FakeMessage:
    """A message (or an error event) as librdkafka's consumer hands it over."""

    def __init__(
        self, topic: str | None, partition: int, offset: int, value: bytes, error: Any = None
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._error = value, error

    def error(self) -> Any:
        return self._error

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes:
        return self._value


class Record(NamedTuple):
    offset: int
    key: bytes
    value: bytes | None


class Changelog(_PartitionReader):
    """Partitions as lists of records; `first` is where compaction or retention left the log."""

    def __init__(self, logs: dict[int, list[Record]], first: dict[int, int] | None = None):
        self.logs = logs
        self.first = first or {}
        self.fetch = 3  # records per fetched batch
        self.asked: dict[int, tuple[int, int]] = {}
        self.hold_after: int | None = None  # batches; then wait for `release`
        self.release = asyncio.Event()

    async def end_offsets(self, topic, partitions):
        return {p: len(self.logs[p]) for p in partitions}

    async def batches(self, topic, ranges):
        self.asked = dict(ranges)
        sent = 0
        for partition, (start, end) in ranges.items():
            offset = max(start, self.first.get(partition, 0))
            while offset < end:
                if sent == self.hold_after:
                    await self.release.wait()
                records = self.logs[partition][offset : min(offset + self.fetch, end)]
                offset += len(records)
                sent += 1
                yield partition, records, offset

    async def stop(self):
        pass


def log_of(*pairs: tuple[bytes, bytes | None]) -> list[Record]:
    return [Record(i, k, v) for i, (k, v) in enumerate(pairs)]


class Changelogs(_PartitionReader):
    """Both tables' changelogs behind one reader, as `PartitionReader` reads any topic;
    while `fail` is set, asking the end offsets raises it."""

    def __init__(self, logs: dict[str, Changelog]) -> None:
        self.logs = logs
        self.fail: BaseException | None = None

    async def end_offsets(self, topic, partitions):
        if self.fail is not None:
            raise self.fail
        return await self.logs[topic].end_offsets(topic, partitions)

    def batches(self, topic, ranges):
        return self.logs[topic].batches(topic, ranges)

    async def stop(self):
        pass


class BuyersChangelog(_PartitionReader):
    """An old days changelog partition of `buyers` buyers, one key each with `value`, made
    as it is read (a rescale's memory test: nothing of it is kept here)."""

    def __init__(self, buyers: int, value: bytes) -> None:
        self.buyers = buyers
        self.value = value

    async def end_offsets(self, topic, partitions):
        return {p: self.buyers for p in partitions}

    async def batches(self, topic, ranges):
        for start in range(0, self.buyers, 500):
            end = min(start + 500, self.buyers)
            yield 0, [Record(b, day_key(b, 20261111), self.value) for b in range(start, end)], end


class NullOut(_KafkaOut):
    """`KafkaOut.send_records` that keeps nothing: every batch delivered at once."""

    def __init__(self) -> None:
        pass

    async def send_records(self, topic, partition, items):
        return [(done(), len(items))]
