"""Bulk catch-up of newly assigned table partitions from their changelog, before Faust's recovery.

Faust's recovery applies the changelog a record at a time (a queue wait and a task per
record, ~6k records/s here), so a worker taking over a partition without a standby copy spent
most of the takeover in it. When a partition is assigned, this reads its changelog from the
local copy's persisted offset to the log's end with a plain consumer, writes it in RocksDB
WriteBatches and persists the offset reached. Faust's recovery then starts from there and
reads only what is left.

It runs inside the group's assignment callback, where aiokafka sends no heartbeats, so it stops
after a time budget well inside the session timeout and leaves the rest to Faust. Stopping
anywhere is safe: the local copy then holds the changelog up to the offset it persisted, which
is exactly what Faust's recovery expects to find. Any wait in that callback also holds Faust's
recovery up (by ~3 s here), so when end offsets read at start-up show nothing worth reading,
the first assignment returns without asking Kafka.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from typing import Any, Protocol

from coupon_stream.connectors.store import PartitionStore
from coupon_stream.foundation import metrics

log = logging.getLogger(__name__)

# Below this many records Faust's own recovery is about as quick as starting a bulk read.
MIN_RECORDS = 1_000


class ChangelogReader(Protocol):
    async def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]: ...

    def batches(
        self, topic: str, ranges: Mapping[int, tuple[int, int]]
    ) -> AsyncGenerator[tuple[int, list[Any], int]]: ...

    async def stop(self) -> None: ...


async def catch_up(
    reader: ChangelogReader,
    store: PartitionStore,
    topic: str,
    partitions: Iterable[int],
    *,
    budget: float,
    still_current: Callable[[], bool],
    ends_hint: Mapping[int, int] | None = None,
    min_records: int = MIN_RECORDS,
) -> dict[int, int]:
    """Apply each partition's changelog past its persisted offset; return records applied.

    Stops early once `budget` seconds have passed or `still_current()` turns false (the group
    rebalanced again); what was applied so far stays, with its offset. With `ends_hint`
    (end offsets read earlier) showing nothing worth reading, it returns without a request:
    a wait in the assignment callback, however short, holds up Faust's own recovery after it.
    """

    def worth_reading(ends: Mapping[int, int]) -> dict[int, tuple[int, int]]:
        ranges = {}
        for partition in partitions:
            persisted = store.persisted_offset(partition)
            start = 0 if persisted is None else persisted + 1  # the reader skips compacted
            end = ends.get(partition, 0)
            if end - start >= min_records:
                ranges[partition] = (start, end)
        return ranges

    if ends_hint is not None and not worth_reading(ends_hint):
        return {}
    started = time.monotonic()
    ranges = worth_reading(await reader.end_offsets(topic, partitions))
    if not ranges:
        return {}
    applied = dict.fromkeys(ranges, 0)
    reached: dict[int, int] = {}
    async with aclosing(reader.batches(topic, ranges)) as batches:
        async for partition, records, position in batches:
            if records:
                # Later records of a key replace earlier ones, as in the log itself.
                store.write(partition, {r.key: r.value for r in records})
                applied[partition] += len(records)
                metrics.STATE_RESTORED.inc(len(records))
                metrics.STATE_BULK_RESTORED.inc(len(records))
            store.persist_offset(partition, position - 1)
            reached[partition] = position
            if time.monotonic() - started > budget or not still_current():
                break
    elapsed = time.monotonic() - started
    total = sum(applied.values())
    left = sum(end - reached.get(p, start) for p, (start, end) in ranges.items())
    log.info(
        "bulk restore of %s partitions %s: %d records in %.1f s (%d records/s); %d offsets "
        "left to Faust's recovery",
        topic,
        ",".join(map(str, sorted(ranges))),
        total,
        elapsed,
        total / elapsed if elapsed else 0,
        left,
    )
    return applied
