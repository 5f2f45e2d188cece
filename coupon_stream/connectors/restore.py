"""Bulk restore of table partitions from their changelogs, in the background.

Faust's recovery applies a changelog a record at a time (a queue wait and a task per
record); a worker taking over partitions without a local copy spent most of the takeover
there. This reads each changelog partition from the local copy's persisted offset to the
log's end with a plain consumer (no group), writes each fetched batch as one RocksDB
WriteBatch (later records of a key replace earlier ones, as in the log) and persists the
offset reached. It decodes nothing.

Stopping anywhere (a rebalance cancels it, a shutdown stops the reader) is safe: the local
copy then holds the changelog up to the offset it persisted, which is where the next restore,
this worker's or Faust's own, starts. Data is written before its offset, so a crash between
the two re-reads a batch: applying the same records again in order changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from coupon_stream.connectors.store import PartitionStore
from coupon_stream.foundation import metrics

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 5.0


class ChangelogReader(Protocol):
    async def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]: ...

    def batches(
        self, topic: str, ranges: Mapping[int, tuple[int, int]]
    ) -> AsyncGenerator[tuple[int, list[Any], int]]: ...

    async def stop(self) -> None: ...


@dataclass
class Part:
    """One changelog partition being read: from `start` to `end`, now at `reached`."""

    table: str
    partition: int
    start: int
    end: int
    reached: int

    @property
    def left(self) -> int:
        return max(0, self.end - self.reached)


@dataclass
class Progress:
    """What a restore has left, per table partition, and how fast it goes: for the logs, the
    `coupon_state_restore_remaining_records` gauge and the readiness body."""

    what: str = "restore"
    export: bool = True  # to the gauge (active copies; a standby's lag is a lag gauge)
    parts: dict[tuple[str, int], Part] = field(default_factory=dict)
    applied: int = 0
    started: float = field(default_factory=time.monotonic)
    _logged: float = field(default_factory=time.monotonic)

    def add(self, part: Part) -> None:
        self.parts[(part.table, part.partition)] = part
        self._export(part)

    def reached(self, table: str, partition: int, position: int, records: int) -> None:
        part = self.parts[(table, partition)]
        part.reached = position
        self.applied += records
        self._export(part)
        now = time.monotonic()
        if now - self._logged >= PROGRESS_LOG_SECONDS:
            self._logged = now
            log.info(
                "%s: %d records left in %d partitions, %.0f records/s, about %.0f s to go",
                self.what,
                self.left(),
                sum(1 for p in self.parts.values() if p.left),
                self.rate(),
                self.eta() or 0.0,
            )

    def left(self) -> int:
        return sum(p.left for p in self.parts.values())

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.applied / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds to go at the rate so far (None before the first records)."""
        rate = self.rate()
        return self.left() / rate if rate else None

    def restoring(self) -> list[dict[str, Any]]:
        """The partitions with records left, for /health/ready."""
        rate = self.rate()
        return [
            {
                "table": p.table,
                "partition": p.partition,
                "records_left": p.left,
                "eta_seconds": round(p.left / rate, 1) if rate else None,
            }
            for p in sorted(self.parts.values(), key=lambda p: (p.table, p.partition))
            if p.left
        ]

    def clear(self) -> None:
        for part in self.parts.values():
            try:
                metrics.STATE_RESTORE_REMAINING.remove(part.table, str(part.partition))
            except KeyError:
                pass  # never exported, or cleared already
        self.parts.clear()

    def _export(self, part: Part) -> None:
        if self.export:
            metrics.STATE_RESTORE_REMAINING.labels(part.table, str(part.partition)).set(part.left)


async def measure(
    reader: ChangelogReader,
    store: PartitionStore,
    table: str,
    topic: str,
    partitions: Iterable[int],
    progress: Progress,
) -> dict[int, Part]:
    """Each partition's range to read, from past its persisted offset to the end it has now."""
    partitions = sorted(partitions)
    ends = await reader.end_offsets(topic, partitions)
    parts = {}
    for partition in partitions:
        persisted = store.persisted_offset(partition)
        start = 0 if persisted is None else persisted + 1  # the reader skips compacted
        parts[partition] = part = Part(table, partition, start, ends.get(partition, 0), start)
        progress.add(part)
    return parts


async def read(
    reader: ChangelogReader,
    store: PartitionStore,
    topic: str,
    parts: Mapping[int, Part],
    progress: Progress,
) -> None:
    """Apply the measured ranges, a fetched batch at a time, each followed by its offset."""
    ranges = {p: (part.start, part.end) for p, part in parts.items() if part.end > part.start}
    if not ranges:
        return
    async with aclosing(reader.batches(topic, ranges)) as batches:
        async for partition, records, position in batches:
            if records:
                store.write(partition, {r.key: r.value for r in records})
                metrics.STATE_RESTORED.inc(len(records))
                metrics.STATE_BULK_RESTORED.inc(len(records))
            store.persist_offset(partition, position - 1)
            progress.reached(parts[partition].table, partition, position, len(records))


async def catch_up(
    reader: ChangelogReader,
    store: PartitionStore,
    table: str,
    topic: str,
    partitions: Iterable[int],
    progress: Progress,
) -> dict[int, Part]:
    """Apply each partition's changelog past its persisted offset, to the end it has now."""
    parts = await measure(reader, store, table, topic, partitions, progress)
    await read(reader, store, topic, parts, progress)
    return parts
