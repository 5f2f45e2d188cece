"""A worker's app in Faust's in-memory test context, for the tests of the app and its stages.

Only the transports are stand-ins (`tests/unit/fakes.py`): Kafka out, the result table,
the by-buyer log's read-back and the consumer group. Faust's consumer, its commit and
acknowledgement code, the tables and the stages are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from coupon_stream.app import CouponStream
from coupon_stream.core.records import encode_rows
from coupon_stream.core.stored import Versioned
from coupon_stream.foundation.settings import Settings
from tests.unit.fakes import FakeOut, FakeSink, LogReader, MemoryGroup


@pytest.fixture
def make_stream() -> Iterator[Callable[..., CouponStream]]:
    """`make_stream(tmp_path, **settings)`: a CouponStream on memory tables whose consumer
    group is a `MemoryGroup`; Faust's own consumer thread is put back at the test's end."""
    with ExitStack() as installed:

        def make(tmp_path: Any, **settings: Any) -> CouponStream:
            reader = LogReader()
            out = FakeOut()
            cs = CouponStream(
                Settings(app_id="unit", data_dir=tmp_path, **settings),
                store="memory://",
                sink=FakeSink(),
                out=out,
                reader=reader,
                changelogs=out.writer(),
            )
            cs.app.finalize()
            cs.app.flow_control.resume()
            topic, partitions = cs.by_buyer.get_topic_name(), cs.settings.partitions
            reader.group = installed.enter_context(MemoryGroup.installed(cs.app, topic, partitions))
            return cs

        yield make


@pytest.fixture
def stream(make_stream: Callable[..., CouponStream], tmp_path: Any) -> CouponStream:
    return make_stream(tmp_path, partitions=4)


def group(cs: CouponStream) -> MemoryGroup:
    """The offsets the worker's group committed (through Faust's real commit path)."""
    assert isinstance(cs.reader, LogReader) and cs.reader.group is not None
    return cs.reader.group


async def put(cs: CouponStream, agent: Any, value: bytes, partition: int = 0) -> None:
    await agent.put(value, partition=partition)
    await cs.checkpoint()


def stored(cs: CouponStream, table: str, key: bytes, partition: int = 0) -> Any:
    (raw,) = cs.caches[table].store.get_many(partition, [key])
    return None if raw is None else Versioned.decode(raw).current


def changelog(cs: CouponStream, table: str, partition: int = 0) -> list[Any]:
    assert isinstance(cs.out, FakeOut)
    return cs.out.logs[(cs.caches[table].changelog_topic, partition)]


def row(order, yuan, gm, status="2", day=20261111, buyer=5, gc="2026-11-11 00:00:00"):  # noqa: ANN001, ANN201
    return [buyer, order, status, day, yuan, gc, gm]


def batch(*rows: Any) -> bytes:
    return encode_rows(list(rows))
