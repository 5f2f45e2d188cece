"""The checkpoint: how applied records become durable, in one order, in this one place.

A checkpoint runs every COUPON_FLUSH_INTERVAL seconds, and sooner when
COUPON_MAX_PENDING_ROWS result rows wait. One runs at a time, in this order:

1. Snapshot: under the apply lock, each table's changed keys move to its flushing layer,
   with the touched (buyer, day) rows, the next offset to apply per partition and the
   consumer events. Records applied from here on belong to the next checkpoint.
2. Derive: a day whose MIN(gmt_create) or MAX(gmt_modified) lost the entry holding it is
   recomputed from the day's entries (the one step whose cost grows with a buyer's
   history, and only for such a replacement); then the result row of every touched day.
3. Changelog: every changed key of both tables, as `Versioned(sid, end offset, current,
   previous)`, each key once; real deletes for the keys the last checkpoint deleted; the
   partition's next-offset mark. Waits until Kafka has acknowledged all of it, and the
   dead letters of the records applied.
4. Local RocksDB: one WriteBatch per table partition, and the changelog offsets it holds.
5. MySQL: touched rows upserted, rows whose day sum fell to <= 0 deleted, in one commit;
   a row the database refuses as data is dead-lettered alone.
6. Offsets: the by-buyer offsets committed, then the events acknowledged.

Why a crash anywhere is harmless: nothing is committed before steps 3 to 5 are done, so
a crash replays the checkpoint's messages from the committed offset. Replay is
deterministic, so the keys a cut-short checkpoint did write hold true values as of its end,
the others as of its start. Each stored value carries the one before the checkpoint, and
`state.Versioned.as_of` reads a value that a checkpoint of another session wrote past the
committed offset as that previous value: every key reads as of the committed offset, and
the replay counts each record once. MySQL is only ever behind, and the replay re-sends
every touched row. docs/design.md spells this out; tests/integration/test_faults.py kills a
worker at each `CRASH_POINTS` entry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from coupon_stream.connectors.kafka import ChangelogWriter, DeadLetter, KafkaOut, row_dead_letter
from coupon_stream.core.state import DAY, MAX_MODIFIED, MIN_CREATED, ResultRow, day_row, extrema
from coupon_stream.core.stored import (
    buyer_prefix,
    day_key,
    encode_value,
    marks,
    parse_day_key,
)
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import Fault, Fenced, GivenUp, NotHeld, classify, retry
from coupon_stream.foundation.health import StallWatch
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.sink import ResultSink, RowKey
from coupon_stream.pipeline.state_stage import Pending, Session, Slot, StateStage, TableCache

log = logging.getLogger(__name__)

# Where a fault test may kill the worker (COUPON_CRASH_POINT): after the step named.
CRASH_POINTS = ("changelog-entries", "changelog", "local", "sink")


class _GivenUp(Exception):
    """A write failed while a rebalance began: the checkpoint is left to the next owner."""


@dataclass(slots=True)
class _Snapshot:
    pending: Pending
    sessions: dict[int, Session]
    assignment: int | None
    layers: dict[str, dict[int, dict[bytes, Slot]]]


class Checkpointer:
    def __init__(
        self,
        settings: Settings,
        stage: StateStage,
        out: KafkaOut,
        changelogs: ChangelogWriter,
        sink: ResultSink,
        commit: Callable[[Mapping[int, int]], Awaitable[bool]],
        acknowledge: Callable[[list[object], bool], Awaitable[None]],
        stalls: StallWatch | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.tables = (stage.entries, stage.days)
        self.out = out
        self.changelogs = changelogs
        self.sink = sink
        self._commit = commit
        self._acknowledge = acknowledge
        self.stalls = stalls or StallWatch(settings.stall_seconds)
        self._lock = asyncio.Lock()

    async def run(self) -> bool:
        """One checkpoint; False if it was given up (a rebalance while the database was down)."""
        async with self._lock:
            snap = await self._snapshot()
            if not snap.pending.tokens:
                return True
            started = time.perf_counter()
            rows = self._derive(snap)
            metrics.SINK_PENDING.set(len(rows) + self.stage.pending.rows())
            try:
                await self._changelog(snap)
                self._local()
                self._crash("local")
                result = await self.sink.write(
                    rows,
                    still_wanted=lambda: self._wanted(snap),
                    epochs=self.stage.claims.epochs_of(snap.pending.next_offset),
                )
            except _GivenUp:
                return await self._give_up(snap, "Kafka", len(rows))
            except NotHeld as lost:
                return await self._drop(snap, lost, len(rows))
            if not result.written:
                return await self._give_up(snap, "the database", len(rows))
            await self._dead_letters(
                [
                    row_dead_letter(self.settings.result_table, row, why, key=key)
                    for key, row, why in result.rejected
                ]
            )
            self._crash("sink")
            committed = await self._commit(snap.pending.next_offset)
            self._release(snap)
            await self._acknowledge(snap.pending.tokens, committed)
            if not committed:
                # Not ours any more: whoever owns them next replays them.
                metrics.CHECKPOINTS_FENCED.labels("offsets").inc()
                log.warning(
                    "the group did not take this checkpoint's offsets (its partitions moved, or "
                    "are moving): %d messages are left to their owners, which replay them",
                    len(snap.pending.tokens),
                )
                await self._forget()
            else:
                for partition in snap.pending.next_offset:
                    self.stalls.committed(partition)
                for cache, layer in zip(self.tables, snap.layers.values(), strict=True):
                    for partition, slots in layer.items():
                        cache.tombstones[partition] = {
                            k
                            for k, (base, cur) in slots.items()
                            if cur is None and base is not None
                        }
            metrics.SINK_PENDING.set(self.stage.pending.rows())
            metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
            return True

    async def _forget(self) -> None:
        """Start the partitions over from the committed offset, this checkpoint's messages
        and those applied while it ran alike: all released, none acknowledged.

        A message left neither would hold Faust's rebalance in `wait_empty` for good: the
        worker would never join its group again, nor stop on SIGTERM.
        """
        await self._acknowledge(await self.stage.forget(), False)

    def _wanted(self, snap: _Snapshot) -> bool:
        """Whether a failing write is still worth retrying: not once a rebalance has begun.

        The partitions may move, and a write landing after their next owner's would put
        older values back.
        """
        return snap.assignment is not None and self.stage.assignment() == snap.assignment

    async def _give_up(self, snap: _Snapshot, what: str, rows: int) -> bool:
        log.warning(
            "%s was down during a rebalance: a checkpoint of %d rows and %d messages is left "
            "to the partitions' next owner, which replays the messages",
            what,
            rows,
            len(snap.pending.tokens),
        )
        await self._abandon(snap)
        return False

    async def _drop(self, snap: _Snapshot, lost: NotHeld, rows: int) -> bool:
        """A store refused the checkpoint: a newer owner claimed a partition, or this worker
        cannot tell any more. Nothing more of it is written; every partition's owner (this
        worker too, after it claims them again) replays it from the committed offset."""
        what = "fenced" if isinstance(lost, Fenced) else "not held"
        metrics.CHECKPOINTS_FENCED.labels(what).inc()
        if isinstance(lost, Fenced):
            epoch = lost.epoch if lost.epoch is not None else await self.sink.epoch(lost.partition)
            log.warning(
                "fenced: partition %d's %s are held by a newer owner (epoch %s, this worker's "
                "%s); this worker's checkpoint of %d rows and %d messages is dropped (the "
                "partition's owner replays them) and its partitions are claimed again",
                lost.partition,
                lost.what.removeprefix("its "),
                epoch,
                self.stage.claims.epochs.get(lost.partition),
                rows,
                len(snap.pending.tokens),
            )
        else:
            log.error(
                "%s; the checkpoint of %d rows and %d messages is dropped and replayed after "
                "the partitions are claimed again",
                lost,
                rows,
                len(snap.pending.tokens),
            )
        self.stalls.failed(lost.partition, str(lost))
        await self._abandon(snap)
        return False

    async def _abandon(self, snap: _Snapshot) -> None:
        """Write no more of the checkpoint: its messages and the state stage's start over."""
        self._release(snap)
        await self._acknowledge(snap.pending.tokens, False)
        await self._forget()

    async def _snapshot(self) -> _Snapshot:
        stage = self.stage
        async with stage.apply_lock:
            pending, stage.pending = stage.pending, Pending()
            layers = {}
            for cache in self.tables:
                layer, cache.dirty = cache.dirty, defaultdict(dict)
                cache.flushing = layer
                layers[cache.name] = layer
            return _Snapshot(pending, dict(stage.sessions), stage.assignment(), layers)

    def _derive(self, snap: _Snapshot) -> dict[RowKey, ResultRow | None]:
        """Recompute the MIN/MAX that a replacement could not retract; the touched rows."""
        days = snap.layers[self.stage.days.name]
        for partition, stale in snap.pending.stale.items():
            slots = days.get(partition, {})
            stale_days = {key: parse_day_key(key) for key in stale if slots[key][1] is not None}
            by_buyer = self.stage.entries.with_prefixes(
                partition,
                snap.sessions[partition],
                {buyer_prefix(buyer) for buyer, _ in stale_days.values()},
            )
            for key, (buyer, effect_time) in stale_days.items():
                day = slots[key][1]
                kept = [
                    e
                    for e in by_buyer[buyer_prefix(buyer)].values()
                    if e is not None and e[DAY] == effect_time
                ]
                created, modified = extrema(kept)
                slots[key][1] = [*day[:MIN_CREATED], created, modified, *day[MAX_MODIFIED + 1 :]]
            metrics.STATE_EXTREMA_RECOMPUTED.inc(len(stale_days))
        rows: dict[RowKey, ResultRow | None] = {}
        for partition, touched in snap.pending.touched.items():
            slots = days.get(partition, {})
            for buyer, effect_time in touched:
                slot = slots.get(day_key(buyer, effect_time))
                rows[(buyer, effect_time)] = day_row(buyer, effect_time, slot and slot[1])
        return rows

    def _writes(self, snap: _Snapshot) -> dict[TableCache, dict[int, dict[bytes, bytes | None]]]:
        """Per table and partition, the bytes this checkpoint writes for each key."""
        writes: dict[TableCache, dict[int, dict[bytes, bytes | None]]] = {}
        next_offset = snap.pending.next_offset
        for cache in self.tables:
            per_partition = writes[cache] = {}
            layer = snap.layers[cache.name]
            for partition in set(layer) | set(cache.tombstones):
                session = snap.sessions.get(partition)
                end = next_offset.get(partition)
                out: dict[bytes, bytes | None] = {}
                for key in cache.tombstones.pop(partition, ()):
                    out[key] = None  # deleted at a committed checkpoint: gone for good
                for key, (base, current) in layer.get(partition, {}).items():
                    if current == base:
                        continue
                    if session is None or end is None:
                        raise RuntimeError(f"{cache.name}[{partition}] changed outside a session")
                    out[key] = encode_value(session.sid, end, current, base)
                if out:
                    per_partition[partition] = out
                    metrics.STATE_WRITES.labels(cache.name).inc(len(out))
        days = writes[self.stage.days]
        for partition, end in next_offset.items():
            days.setdefault(partition, {}).update(marks(end))
        return writes

    async def _changelog(self, snap: _Snapshot) -> None:
        self._pending_writes = writes = self._writes(snap)
        self._confirmed: dict[TableCache, dict[int, int]] = {c: {} for c in self.tables}
        partitions = sorted({p for cache in self.tables for p in writes[cache]})
        appends = [asyncio.ensure_future(self._append(snap, p, writes)) for p in partitions]
        try:
            for i, done in enumerate(asyncio.as_completed(appends)):
                await done
                if i == 0:
                    self._crash("changelog-entries")  # some partitions' changelogs written
        finally:
            for task in appends:
                task.cancel()
            await asyncio.gather(*appends, return_exceptions=True)
        await self._dead_letters(snap.pending.dead_letters)
        self._crash("changelog")

    async def _append(
        self,
        snap: _Snapshot,
        partition: int,
        writes: dict[TableCache, dict[int, dict[bytes, bytes | None]]],
    ) -> None:
        """One partition's records of both tables, in one transaction, until Kafka has them."""
        records = {
            c.changelog_topic: writes[c][partition] for c in self.tables if partition in writes[c]
        }

        def failed(exc: BaseException, delay: float) -> None:
            metrics.CHANGELOG_RETRIES.inc()
            self.stalls.failed(partition, f"changelog of partition {partition}: {exc!r}")
            log.error(
                "changelog append of partition %d failed, sent again in %.1f s: %r",
                partition,
                delay,
                exc,
            )

        try:
            last = await retry(
                lambda: self.changelogs.append(partition, records),
                wanted=lambda: self._wanted(snap),
                failed=failed,
            )
        except GivenUp as given_up:
            raise _GivenUp from given_up
        except NotHeld:
            raise
        except Exception as exc:
            log.critical(
                "changelog of partition %d refused %d records for good: %r",
                partition,
                sum(len(r) for r in records.values()),
                exc,
            )
            raise
        for cache in self.tables:
            if cache.changelog_topic in last:
                self._confirmed[cache][partition] = last[cache.changelog_topic]

    def _local(self) -> None:
        for cache in self.tables:
            for partition, items in self._pending_writes[cache].items():
                if not cache.store.is_open(partition):
                    continue  # moved away meanwhile; its next owner restores the changelog
                cache.store.write(partition, items)
                cache.store.persist_offset(partition, self._confirmed[cache][partition])

    def _release(self, snap: _Snapshot) -> None:
        for cache in self.tables:
            if cache.flushing is snap.layers[cache.name]:
                cache.flushing = {}

    async def _dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send the dead letters and wait for Kafka to have them, retrying what can succeed."""

        async def send_left() -> None:
            """Send those not delivered yet; raise a permanent error first, if any."""
            nonlocal letters
            sent = [await self.out.dead_letter(d) for d in letters]
            results = await asyncio.gather(*sent, return_exceptions=True)
            failed = [
                (d, r)
                for d, r in zip(letters, results, strict=True)
                if isinstance(r, BaseException)
            ]
            letters = [d for d, _ in failed]
            errors = sorted((r for _, r in failed), key=lambda e: classify(e) is Fault.TRANSIENT)
            if errors:
                raise errors[0]

        await retry(
            send_left,
            failed=lambda exc, delay: log.error(
                "%d dead letters not delivered, sent again in %.1f s: %r", len(letters), delay, exc
            ),
        )

    def _crash(self, point: str) -> None:
        if self.settings.crash_point == point:
            log.critical("COUPON_CRASH_POINT=%s reached: killing the worker (fault test)", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
