"""The checkpoint: how applied records become durable, in one order, in this one place.

A checkpoint runs every COUPON_FLUSH_INTERVAL seconds, and sooner when
COUPON_MAX_PENDING_ROWS result rows wait. One runs at a time, a `Checkpoint` object per
interval whose `commit` takes these steps in order, each checked against the one before
(`Step`):

1. Snapshot: under the apply lock, each table's changed keys go to the checkpoint
   (`TableCache.snapshot`), with the touched (buyer, day) rows, the next offset to apply
   per partition and the consumer events. Records applied from here on belong to the next
   checkpoint; until this one is over they read the values it writes.
2. Derive: a day whose MIN(gmt_create) or MAX(gmt_modified) lost the entry holding it is
   recomputed from the day's entries (the one step whose cost grows with a buyer's
   history, and only for such a replacement; the day's extremes are then kept in memory,
   so that it is rarely read again: `state.Extremes`); then the result row of every
   touched day.
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
`stored.Versioned.as_of` reads a value that a checkpoint of another session wrote past the
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
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum

from coupon_stream.connectors.faults import Fault, classify, retry
from coupon_stream.connectors.kafka import ChangelogWriter, DeadLetter, KafkaOut, row_dead_letter
from coupon_stream.connectors.mysql import ResultSink, RowKey
from coupon_stream.core.grants import Grant, Policy, change
from coupon_stream.core.state import (
    DAY,
    SUM,
    ResultRow,
    day_row,
    recomputed,
)
from coupon_stream.core.stored import (
    buyer_prefix,
    day_key,
    day_marker,
    encode_value,
    marks,
    parse_day_key,
)
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import Fenced, GivenUp, NotHeld
from coupon_stream.foundation.settings import Settings
from coupon_stream.foundation.stalls import StallWatch
from coupon_stream.pipeline.state_stage import (
    SAVED,
    SUPERSEDED,
    VALUE,
    Pending,
    Snapshot,
    StateStage,
    TableCache,
    Token,
)

log = logging.getLogger(__name__)

# Where a fault test may kill the worker (COUPON_CRASH_POINT): after the step named.
CRASH_POINTS = ("changelog-entries", "changelog", "local", "sink")


class Step(StrEnum):
    """Where a checkpoint is: each step is taken once, in this order, or it is abandoned."""

    OPEN = "open"
    SNAPSHOTTED = "snapshotted"  # 1: the records applied so far are this checkpoint's
    CHANGELOGGED = "changelogged"  # 3: Kafka has the changelogs and the dead letters
    STORED = "stored"  # 4: local RocksDB has them
    WRITTEN = "written"  # 5: MySQL has the rows
    COMMITTED = "committed"  # 6: the offsets are committed (or the group refused them)
    ABANDONED = "abandoned"  # given up or fenced: its messages are replayed


class StepError(RuntimeError):
    """A checkpoint step taken out of order: a bug, never a fault of the world."""


Writes = dict[TableCache, dict[int, dict[bytes, bytes | None]]]
"""Per table and partition, the bytes a checkpoint writes for each key (None: a delete)."""


async def every(
    interval: float,
    work: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run `work` every `interval` seconds from start to start, at once after a run that took
    longer. A row is visible once the checkpoint after its record is over: counting the
    interval from a checkpoint's end would add a checkpoint's time to every row's wait."""
    took = 0.0
    while True:
        await sleep(max(0.0, interval - took))
        began = clock()
        await work()
        took = clock() - began


class Checkpointer:
    """Runs one `Checkpoint` at a time, every interval or sooner; holds what they share."""

    def __init__(
        self,
        settings: Settings,
        stage: StateStage,
        out: KafkaOut,
        changelogs: ChangelogWriter,
        sink: ResultSink,
        commit: Callable[[Mapping[int, int]], Awaitable[bool]],
        acknowledge: Callable[[list[Token], bool], Awaitable[None]],
        stalls: StallWatch | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.out = out
        self.changelogs = changelogs
        self.sink = sink
        self.commit = commit
        self.acknowledge = acknowledge
        self.stalls = stalls or StallWatch(settings.stall_seconds)
        self.policy = settings.policy
        if self.policy is not None:
            metrics.grant_series(len(self.policy.tiers))
        self._lock = asyncio.Lock()

    async def run(self) -> bool:
        """One checkpoint; False if it was abandoned (given up in a rebalance, or fenced)."""
        async with self._lock:
            return await Checkpoint(self).commit()


class Checkpoint:
    """One interval's checkpoint: it owns its snapshot and walks its steps in order.

    After quixstreams' `Checkpoint` (one object per interval whose `commit` lists the steps)
    and its partition transactions (the state checked at each step).
    """

    def __init__(self, owner: Checkpointer) -> None:
        self.owner = owner
        self.stage = owner.stage
        self._snapshot: Snapshot | None = None
        self.state = Step.OPEN
        self.started = self._step_began = time.perf_counter()
        self.rows: dict[RowKey, ResultRow | None] = {}
        # The grant events of each partition, and the grants table's rows (`grants`).
        self.grants: dict[RowKey, Grant] = {}
        self.events: dict[int, dict[bytes, bytes | None]] = {}
        self.writes: Writes = {}
        # Per table and partition, the changelog offset its records reached (step 3).
        self.reached: dict[TableCache, dict[int, int]] = {c: {} for c in self.stage.caches}

    async def commit(self) -> bool:
        """The steps in order; False if the checkpoint was abandoned."""
        pending = await self.take_snapshot()
        if not pending.tokens:
            self.release()
            return True
        self.derive()
        self._took("derive")
        metrics.SINK_PENDING.set(len(self.rows) + self.stage.pending.rows())
        try:
            await self.changelog()
            self._took("changelog")
            self.store()
            self._took("local")
            await self.write()
            self._took("sink")
        except GivenUp:
            where = "Kafka" if self.state is Step.SNAPSHOTTED else "the database"
            log.warning(
                "%s was down during a rebalance: a checkpoint of %d rows and %d messages is "
                "left to the partitions' next owner, which replays the messages",
                where,
                len(self.rows),
                len(pending.tokens),
            )
            await self.abandon()
            return False
        except NotHeld as lost:
            await self.drop(lost)
            return False
        await self.commit_offsets()
        self._took("offsets")
        metrics.SINK_PENDING.set(self.stage.pending.rows())
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - self.started)
        return True

    def _took(self, step: str) -> None:
        """A step is over: its time (from the end of the one before) goes to its metric."""
        now = time.perf_counter()
        metrics.CHECKPOINT_STEP_SECONDS.labels(step).observe(now - self._step_began)
        self._step_began = now

    def _after(self, done: Step) -> None:
        """A step begins: the one before it must be `done` (each step sets its own state
        once it has succeeded)."""
        if self.state is not done:
            raise StepError(f"checkpoint step after {done} taken in state {self.state}")

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise StepError("checkpoint has no snapshot yet")
        return self._snapshot

    # -- 1, 2: snapshot and derive ----------------------------------------------------------

    async def take_snapshot(self) -> Pending:
        """Under the apply lock, the tables' changed keys, the touched rows, the next offset
        to apply per partition and the messages: the records applied from here on belong to
        the next checkpoint."""
        self._after(Step.OPEN)
        self._snapshot = await self.stage.snapshot()
        self.state = Step.SNAPSHOTTED
        return self._snapshot.pending

    def derive(self) -> None:
        """Recompute the MIN/MAX that a replacement could not retract; the touched rows; the
        bytes to write."""
        self._after(Step.SNAPSHOTTED)
        snap = self.snapshot
        days = snap.layers[self.stage.days.name]
        for partition, stale in snap.pending.stale.items():
            slots = days.get(partition, {})
            stale_days = {key: parse_day_key(key) for key in stale if slots[key][VALUE] is not None}
            markers: dict[bytes, set[bytes]] = defaultdict(set)
            for buyer, effect_time in stale_days.values():
                markers[buyer_prefix(buyer)].add(day_marker(effect_time))
            by_buyer = self.stage.entries.with_prefixes(
                partition, snap.sessions[partition], markers
            )
            for key, (buyer, effect_time) in stale_days.items():
                day = slots[key][VALUE]
                kept = [
                    e
                    for e in by_buyer[buyer_prefix(buyer)].values()
                    if e is not None and e[DAY] == effect_time
                ]
                slots[key][VALUE], extremes = recomputed(day, kept)
                self.stage.keep_extremes(partition, key, extremes)
            metrics.STATE_EXTREMA_RECOMPUTED.inc(len(stale_days))
        for partition, touched in snap.pending.touched.items():
            slots = days.get(partition, {})
            for buyer, effect_time in touched:
                slot = slots.get(day_key(buyer, effect_time))
                self.rows[(buyer, effect_time)] = day_row(buyer, effect_time, slot and slot[VALUE])
        if self.owner.policy is not None:
            self._grants(self.owner.policy)
        self.writes = self._encode()

    def _grants(self, policy: Policy) -> None:
        """Each touched day whose tier changed since the last checkpoint is one grant event,
        and one row of the grants table (docs/design.md, "Coupon grants"): the tier as of
        this checkpoint's end, its version the partition's log position there. A partition
        being replayed past a checkpoint that never committed re-asserts every touched day."""
        snap = self.snapshot
        days = snap.layers[self.stage.days.name]
        for partition, touched in snap.pending.touched.items():
            session = snap.sessions[partition]
            position = session.version_base + snap.pending.next_offset[partition]
            reassert = partition in snap.replaying
            slots = days.get(partition, {})
            events = self.events[partition] = {}
            for buyer, effect_time in touched:
                slot = slots.get(day_key(buyer, effect_time))
                before = slot[SAVED][SUM] if slot and slot[SAVED] else None
                after = slot[VALUE][SUM] if slot and slot[VALUE] else None
                grant = change(policy, buyer, effect_time, before, after, position, reassert)
                if grant is not None:
                    self.grants[(buyer, effect_time)] = grant
                    events[grant.key()] = grant.value()

    def _encode(self) -> Writes:
        """Every changed key of both tables as `Versioned(sid, end offset, current,
        previous)`, each key once; real deletes for the keys the last checkpoint deleted;
        each partition's marks."""
        snap = self.snapshot
        writes: Writes = {}
        next_offset = snap.pending.next_offset
        for cache in self.stage.caches:
            per_partition = writes[cache] = {}
            layer = snap.layers[cache.name]
            tombstones = cache.take_tombstones()
            for partition in set(layer) | set(tombstones):
                session = snap.sessions.get(partition)
                end = next_offset.get(partition)
                out: dict[bytes, bytes | None] = dict.fromkeys(tombstones.get(partition, ()))
                for key, slot in layer.get(partition, {}).items():
                    saved, current = slot[SAVED], slot[VALUE]
                    if current == saved and len(slot) <= SUPERSEDED:
                        continue
                    if session is None or end is None:
                        raise RuntimeError(f"{cache.name}[{partition}] changed outside a session")
                    out[key] = encode_value(session.sid, end, current, saved)
                if out:
                    per_partition[partition] = out
                    metrics.STATE_WRITES.labels(cache.name).inc(len(out))
        days = writes[self.stage.days]
        for partition, end in next_offset.items():
            days.setdefault(partition, {}).update(marks(end, snap.sessions[partition].high))
        return writes

    # -- 3: changelogs ----------------------------------------------------------------------

    async def changelog(self) -> None:
        """Each partition's records of both tables in one transaction (`fencing`), all
        partitions at once, until Kafka has them; then the dead letters."""
        self._after(Step.SNAPSHOTTED)
        partitions = sorted({p for per_partition in self.writes.values() for p in per_partition})
        appends = [asyncio.ensure_future(self._append(p)) for p in partitions]
        try:
            for i, done in enumerate(asyncio.as_completed(appends)):
                await done
                if i == 0:
                    self._crash("changelog-entries")  # some partitions' changelogs written
        finally:
            for task in appends:
                task.cancel()
            await asyncio.gather(*appends, return_exceptions=True)
        await self._dead_letters(self.snapshot.pending.dead_letters)
        self._crash("changelog")
        self.state = Step.CHANGELOGGED

    async def _append(self, partition: int) -> None:
        owner = self.owner
        records = {
            c.changelog_topic: per_partition[partition]
            for c, per_partition in self.writes.items()
            if partition in per_partition
        }
        if self.events.get(partition):  # in the same transaction: out iff the state is
            records[owner.settings.grants_topic] = self.events[partition]

        def failed(exc: BaseException, delay: float) -> None:
            metrics.CHANGELOG_RETRIES.inc()
            owner.stalls.failed(partition, f"changelog of partition {partition}: {exc!r}")
            log.error(
                "changelog append of partition %d failed, sent again in %.1f s: %r",
                partition,
                delay,
                exc,
            )

        try:
            last = await retry(
                lambda: owner.changelogs.append(partition, records),
                wanted=self.snapshot.still_assigned,
                failed=failed,
            )
        except (GivenUp, NotHeld):
            raise
        except Exception as exc:
            log.critical(
                "changelog of partition %d refused %d records for good: %r",
                partition,
                sum(len(r) for r in records.values()),
                exc,
            )
            raise
        for cache in self.writes:
            if cache.changelog_topic in last:
                self.reached[cache][partition] = last[cache.changelog_topic]

    async def _dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send the dead letters and wait for Kafka to have them, retrying what can succeed."""

        async def send_left() -> None:
            """Send those not delivered yet; raise a permanent error first, if any."""
            nonlocal letters
            sent = [await self.owner.out.dead_letter(d) for d in letters]
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

    # -- 4: local RocksDB -------------------------------------------------------------------

    def store(self) -> None:
        """One WriteBatch per table partition, with the changelog offset it reached."""
        self._after(Step.CHANGELOGGED)
        for cache, per_partition in self.writes.items():
            for partition, values in per_partition.items():
                cache.persist(partition, values, self.reached[cache][partition])
        self._crash("local")
        self.state = Step.STORED

    # -- 5: MySQL ---------------------------------------------------------------------------

    async def write(self) -> None:
        """The touched rows in one transaction, fenced by the partitions' epochs; a row the
        database refuses as data is dead-lettered alone. Raises `GivenUp` if the database
        stayed down into a rebalance."""
        self._after(Step.STORED)
        pending = self.snapshot.pending
        result = await self.owner.sink.write(
            self.rows,
            still_wanted=self.snapshot.still_assigned,
            epochs=self.stage.claims.epochs_of(pending.next_offset),
            grants=self.grants,
        )
        if not result.written:
            raise GivenUp("the result table was not written before a rebalance")
        await self._dead_letters(
            [
                row_dead_letter(self.owner.settings.result_table, row, why, key=key)
                for key, row, why in result.rejected
            ]
        )
        self._crash("sink")
        self.state = Step.WRITTEN

    # -- 6: offsets -------------------------------------------------------------------------

    async def commit_offsets(self) -> None:
        """Commit the by-buyer offsets, then acknowledge the messages; if the group refused
        them (the partitions moved), release them instead and start over."""
        self._after(Step.WRITTEN)
        owner, pending = self.owner, self.snapshot.pending
        committed = await owner.commit(pending.next_offset)
        self.state = Step.COMMITTED
        self.release()
        await owner.acknowledge(pending.tokens, committed)
        if not committed:
            # Not ours any more: whoever owns them next replays them.
            metrics.CHECKPOINTS_FENCED.labels("offsets").inc()
            log.warning(
                "the group did not take this checkpoint's offsets (its partitions moved, or "
                "are moving): %d messages are left to their owners, which replay them",
                len(pending.tokens),
            )
            await self._forget()
            return
        for partition in pending.next_offset:
            owner.stalls.committed(partition)
        for cache in self.stage.caches:
            cache.committed(self.snapshot.layers[cache.name])
        if owner.policy is not None:
            self._count_grants(owner.policy)

    def _count_grants(self, policy: Policy) -> None:
        """The grant metrics, summed per label first: looking a labelled series up costs more
        than all else a grant does here."""
        events: Counter[tuple[str, int]] = Counter()
        yuan: Counter[str] = Counter()
        for grant in self.grants.values():
            if grant.tier != grant.tier_before:  # a re-assertion changes nothing
                events[grant.kind, grant.tier] += 1
                yuan[grant.kind] += abs(
                    policy.amount(grant.tier) - policy.amount(grant.tier_before)
                )
        for (kind, tier), n in events.items():
            metrics.GRANT_EVENTS.labels(kind, str(tier)).inc(n)
        for kind, amount in yuan.items():
            metrics.GRANT_YUAN.labels(kind).inc(amount)

    # -- abandoned ------------------------------------------------------------------------

    async def drop(self, lost: NotHeld) -> None:
        """A store refused the checkpoint: a newer owner claimed a partition, or this worker
        cannot tell any more. Nothing more of it is written; every partition's owner (this
        worker too, after it claims them again) replays it from the committed offset."""
        what = "fenced" if isinstance(lost, Fenced) else "not held"
        metrics.CHECKPOINTS_FENCED.labels(what).inc()
        tokens = len(self.snapshot.pending.tokens)
        if isinstance(lost, Fenced):
            epoch = lost.epoch
            if epoch is None:
                epoch = await self.owner.sink.epoch(lost.partition)
            log.warning(
                "fenced: partition %d's %s are held by a newer owner (epoch %s, this worker's "
                "%s); this worker's checkpoint of %d rows and %d messages is dropped (the "
                "partition's owner replays them) and its partitions are claimed again",
                lost.partition,
                lost.what.removeprefix("its "),
                epoch,
                self.stage.claims.epochs.get(lost.partition),
                len(self.rows),
                tokens,
            )
        else:
            log.error(
                "%s; the checkpoint of %d rows and %d messages is dropped and replayed after "
                "the partitions are claimed again",
                lost,
                len(self.rows),
                tokens,
            )
        self.owner.stalls.failed(lost.partition, str(lost))
        await self.abandon()

    async def abandon(self) -> None:
        """Write no more of the checkpoint: its messages and the state stage's start over."""
        self.state = Step.ABANDONED
        self.release()
        await self.owner.acknowledge(self.snapshot.pending.tokens, False)
        await self._forget()

    def release(self) -> None:
        """Records read the store again, not this checkpoint's layers."""
        if self._snapshot is not None:
            for cache in self.stage.caches:
                cache.release(self._snapshot.layers[cache.name])

    async def _forget(self) -> None:
        """Start the partitions over from the committed offset, this checkpoint's messages
        and those applied while it ran alike: all released, none acknowledged.

        A message left neither would hold Faust's rebalance in `wait_empty` for good: the
        worker would never join its group again, nor stop on SIGTERM.
        """
        await self.owner.acknowledge(await self.stage.forget(), False)

    def _crash(self, point: str) -> None:
        if self.owner.settings.crash_point == point:
            log.critical("COUPON_CRASH_POINT=%s reached: killing the worker (fault test)", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
