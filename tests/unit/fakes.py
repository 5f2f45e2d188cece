"""The unit tests' one set of fakes for the worker's transports: Kafka out, the sink, reads.

They stand in for `KafkaOut`, `ResultSink` and `PartitionReader` only, never for the code
under test. Each records what it was given, and can fail in the ways the real one does.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, NamedTuple

from aiokafka.errors import KafkaTimeoutError
from faust.types import TP

from coupon_stream.core.state import ResultRow
from coupon_stream.pipeline.sink import WriteResult


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


class FakeOut:
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

    async def send_records(
        self, topic: str, partition: int, records: Any
    ) -> list[tuple[asyncio.Future[Any], int]]:
        records = list(records)
        if self.refuse_next:
            self.refuse_next = False
            raise KafkaTimeoutError()
        if self.fail_next:
            self.fail_next = False
            return [(done(exc=KafkaTimeoutError()), len(records))]
        log = self.logs[(topic, partition)]
        first = len(log)
        for record in records:
            if self.crash_after is not None:
                if self.crash_after <= 0:
                    raise Crash()
                self.crash_after -= 1
            log.append(record)
        return [(done(Meta(first)), len(records))]


class FakeSink:
    """`ResultSink`: the table as a dict of (buyer_id, effect_time) -> row."""

    def __init__(self) -> None:
        self.table: dict[tuple[int, int], ResultRow] = {}
        self.writes = 0

    async def start(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def write(self, rows: Any, still_wanted: Any = None) -> WriteResult:
        self.writes += 1
        for key, row in rows.items():
            if row is None:
                self.table.pop(key, None)
            else:
                self.table[key] = row
        return WriteResult(True)

    def rows(self) -> set[tuple[Any, ...]]:
        return {tuple(r) for r in self.table.values()}


class DownSink(FakeSink):
    """A database that is down: every attempt fails until the write is no longer wanted."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.attempting = asyncio.Event()

    async def write(self, rows: Any, still_wanted: Any = None) -> WriteResult:
        while still_wanted is None or still_wanted():
            self.attempts += 1
            self.attempting.set()
            await asyncio.sleep(0.01)
        return WriteResult(False)


class MemoryGroup:
    """Faust's Kafka transport for one consumer group, in memory (kstreams' test client idea).

    Installed under Faust's real consumer (`attach`), it replaces only the aiokafka thread
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
    def attach(cls, app: Any, topic: str, partitions: int) -> MemoryGroup:
        group = cls(topic, partitions)
        app.consumer._thread = group
        return group

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


class Record(NamedTuple):
    offset: int
    key: bytes
    value: bytes | None


class Changelog:
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
