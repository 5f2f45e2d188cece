"""A worker's app in Faust's in-memory test context, for the tests of the app and its stages.

Only the transports are stand-ins (`tests/unit/fakes.py`): Kafka out, the result table,
the by-buyer log's read-back and the consumer group. Faust's consumer, its commit and
acknowledgement code, the tables and the stages are the real ones.
"""

from __future__ import annotations

from typing import Any

import pytest

from coupon_stream.app import CouponStream
from coupon_stream.core.records import encode_rows
from coupon_stream.core.stored import Versioned
from coupon_stream.foundation.settings import Settings
from tests.unit.fakes import FakeOut, FakeSink, MemoryGroup


class LogReader:
    """The by-buyer log as a dict of (partition, offset) -> value, for the read-backs."""

    def __init__(self) -> None:
        self.log: dict[tuple[int, int], bytes] = {}
        self.reads: list[tuple[int, int, int]] = []
        self.group: MemoryGroup | None = None

    async def committed(self, group: str, topic: str, partition: int) -> int | None:
        return None if self.group is None else await self.group.read(group, topic, partition)

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Any]:
        self.reads.append((partition, start, end))
        return [
            (o, self.log[(partition, o)], None)
            for o in range(start, end)
            if (partition, o) in self.log
        ]

    async def stop(self) -> None:
        pass


def make_stream(tmp_path: Any, **settings: Any) -> CouponStream:
    """A CouponStream on memory tables whose consumer group is a `MemoryGroup`."""
    reader = LogReader()
    out = FakeOut()
    cs = CouponStream(
        Settings(app_id="unit", data_dir=tmp_path, **settings),
        store="memory://",
        sink=FakeSink(),
        out=out,
        reader=reader,
        changelogs=out.writer(),  # type: ignore[arg-type]
    )
    cs.app.finalize()
    cs.app.flow_control.resume()
    s = cs.settings
    reader.group = MemoryGroup.attach(cs.app, cs.by_buyer.get_topic_name(), s.partitions)
    return cs


@pytest.fixture
def stream(tmp_path: Any) -> CouponStream:
    return make_stream(tmp_path, partitions=4)


def group(cs: CouponStream) -> MemoryGroup:
    """The offsets the worker's group committed (through Faust's real commit path)."""
    assert cs.reader.group is not None  # type: ignore[attr-defined]
    return cs.reader.group  # type: ignore[attr-defined,no-any-return]


async def put(cs: CouponStream, agent: Any, value: bytes, partition: int = 0) -> None:
    await agent.put(value, partition=partition)
    await cs.checkpoint()


def stored(cs: CouponStream, table: str, key: bytes, partition: int = 0) -> Any:
    (raw,) = cs.caches[table].store.get_many(partition, [key])
    return None if raw is None else Versioned.decode(raw).current


def changelog(cs: CouponStream, table: str, partition: int = 0) -> list[Any]:
    return cs.out.logs[(cs.caches[table].changelog_topic, partition)]  # type: ignore[attr-defined]


def row(order, yuan, gm, status="2", day=20261111, buyer=5, gc="2026-11-11 00:00:00"):  # noqa: ANN001, ANN201
    return [buyer, order, status, day, yuan, gc, gm]


def batch(*rows: list[Any]) -> bytes:
    return encode_rows(list(rows))
