"""The state stage: by-buyer messages -> entries and days tables -> touched result rows.

Applying a message changes only in-memory caches (`TableCache`): each key a record touches
is read once (one multi-get per message and table) and then changed in memory until the
next checkpoint writes it (see `checkpoint`). Every offset of a partition is applied in
order, whatever Faust's consumer delivers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NamedTuple

from coupon_stream.connectors.faults import retry
from coupon_stream.connectors.kafka import DeadLetter, PartitionReader
from coupon_stream.connectors.store import PartitionStore
from coupon_stream.core.records import BUYER, ORDER, ROW_DAY, STATUS, Row, decode_rows, encode_rows
from coupon_stream.core.state import (
    COUNTED,
    CURRENT,
    DAY,
    Extremes,
    Outcome,
    apply_row,
    latest_day,
    retention_cutoff,
)
from coupon_stream.core.stored import (
    HIGH_MARK_KEY,
    MARK_KEYS,
    META_KEYS,
    WATERMARK_KEY,
    day_key,
    entry_key,
    is_day_key,
    parse_day_key,
    read_marks,
    read_superseded,
    read_value,
)
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import GivenUp, NotHeld
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.fencing import Claims

log = logging.getLogger(__name__)

# A partition that delivered nothing for this long while its log holds more is read back.
QUIET_SECONDS = 10.0
# One attempt to read a range of by-buyer messages back (the brokers may not answer).
READ_SECONDS = 30.0
# Days whose extremes a partition keeps in memory (`state.Extremes`); past it, the oldest go.
MAX_KEPT_DAYS = 10_000


class ReadBack(NamedTuple):
    """A checkpoint token for messages applied without a consumer event."""

    partition: int
    next_offset: int


Token = object
"""What a checkpoint hands back once its messages are safe: a consumer event (opaque here:
only the app knows the engine's type) or a `ReadBack`."""


class Session(NamedTuple):
    """This worker's hold of one partition, from its assignment to its revocation.

    `start` is the committed by-buyer offset it began from: stored values written past it
    by another session belong to a checkpoint that never committed (`Versioned.as_of`).
    `high` is the highest offset a checkpoint of any session reached: up to there, grant
    events and rows may be out already, from a checkpoint that never committed.
    """

    sid: int
    start: int
    high: int = 0
    version_base: int = 0  # of grant versions (`stored.VERSION_BASE_KEY`)


Slot = list[Any]
"""One key in a cache: its value as of the last checkpoint (`SAVED`) and now (`VALUE`), and
a third item (`SUPERSEDED`) when its stored record was written by a checkpoint that never
committed (`stored.read_superseded`): the next checkpoint writes it whatever its value. A
list, not an object: one is made per key a record touches."""
SAVED: Final = 0
VALUE: Final = CURRENT  # a slot is `apply_row`'s cell
SUPERSEDED: Final = 2
Layer = dict[int, dict[bytes, Slot]]
"""A table's changed keys per partition: the ones changed since the last checkpoint, or
the ones a checkpoint is writing."""


class TableCache:
    """One state table's keys changed since the last checkpoint, per partition.

    Records change the `changed` layer; a checkpoint takes it (`snapshot`) and writes it
    while the next records start a new one, and until it is done (`release`) records read
    the values it is writing. The keys a committed checkpoint deleted are purged (truly
    deleted) by the next one (`take_tombstones`).
    """

    def __init__(self, name: str, store: PartitionStore, changelog_topic: str) -> None:
        self.name = name
        self.store = store
        self.changelog_topic = changelog_topic
        self._changed: Layer = defaultdict(dict)
        self._writing: Layer = {}
        self._tombstones: dict[int, set[bytes]] = defaultdict(set)

    def load(self, partition: int, keys: Iterable[bytes], session: Session) -> dict[bytes, Slot]:
        """The partition's changed layer, with a slot for each of `keys`.

        Most keys of a message are in no layer yet (new orders): one pass picks the keys
        missing from the changed layer (each once), and only those are looked for in the
        layer being written, then read with one multi-get.
        """
        changed = self._changed[partition]
        missing = {key: None for key in keys if key not in changed}
        if not missing:
            return changed
        writing = self._writing.get(partition)
        if writing:
            for key in [key for key in missing if key in writing]:
                value = writing[key][VALUE]
                changed[key] = [value, value]
                del missing[key]
            if not missing:
                return changed
        start, sid = session.start, session.sid
        for key, raw in zip(missing, self.store.get_many(partition, list(missing)), strict=True):
            if raw is None:
                changed[key] = [None, None]
                continue
            value, superseded = read_superseded(raw, start, sid)
            changed[key] = [value, value, True] if superseded else [value, value]
        return changed

    def items(self, partition: int, session: Session) -> Iterator[Any]:
        """(key, current value) of every key of the partition, unwritten changes included."""
        layers = [self._writing.get(partition, {}), self._changed.get(partition, {})]
        seen: set[bytes] = set()
        for layer in reversed(layers):
            for key, slot in layer.items():
                if key not in seen:
                    seen.add(key)
                    yield key, slot[VALUE]
        for key, raw in self.store.items(partition):
            if key not in seen and key not in META_KEYS:
                yield key, read_value(raw, session.start, session.sid)

    def with_prefixes(
        self, partition: int, session: Session, prefixes: Mapping[bytes, Collection[bytes]]
    ) -> dict[bytes, dict[bytes, Any]]:
        """Per prefix, the keys starting with it and their values as of the checkpoint being
        written (the stored values under the layer it writes): one pass over the layer, one
        RocksDB prefix scan per prefix. A stored value is decoded only if its bytes hold one
        of the prefix's markers (`stored.day_marker`); the layer's values all come."""
        found: dict[bytes, dict[bytes, Any]] = {p: {} for p in prefixes}
        if not found:
            return found
        size = len(next(iter(found)))
        for prefix, values in found.items():
            markers = prefixes[prefix]
            for key, raw in self.store.items(partition, prefix):
                if any(m in raw for m in markers):
                    values[key] = read_value(raw, session.start, session.sid)
        for key, slot in self._writing.get(partition, {}).items():
            prefixed = found.get(key[:size])
            if prefixed is not None:
                prefixed[key] = slot[VALUE]
        return found

    # -- what a checkpoint does with it ----------------------------------------------------

    def snapshot(self) -> Layer:
        """Hand the changed keys to a checkpoint; records start a new layer."""
        self._writing, self._changed = self._changed, defaultdict(dict)
        return self._writing

    def take_tombstones(self) -> dict[int, set[bytes]]:
        """The keys to purge, per partition (the checkpoint writing them takes them)."""
        tombstones, self._tombstones = self._tombstones, defaultdict(set)
        return tombstones

    def committed(self, layer: Layer) -> None:
        """The checkpoint of `layer` is committed: the keys it deleted are purged next."""
        for partition, slots in layer.items():
            self._tombstones[partition] = {
                k
                for k, slot in slots.items()
                if slot[VALUE] is None and (slot[SAVED] is not None or len(slot) > SUPERSEDED)
            }

    def release(self, layer: Layer) -> None:
        """The checkpoint of `layer` is over: records read the store again."""
        if self._writing is layer:
            self._writing = {}

    def persist(self, partition: int, values: dict[bytes, bytes | None], offset: int) -> None:
        """Write a checkpoint's values of a partition locally, with the changelog offset
        they reach; not if the partition moved away (its next owner restores them)."""
        if self.store.is_open(partition):
            self.store.write(partition, values)
            self.store.persist_offset(partition, offset)

    def drop(self) -> None:
        """Forget unwritten changes (a rebalance: the partitions' next owner replays them)."""
        self._changed = defaultdict(dict)
        self._writing = {}
        self._tombstones = defaultdict(set)


class _View:
    """One partition's caches as `state.StateView`: the changed layers' slots are its cells."""

    __slots__ = ("entries", "days", "stale", "touched", "extremes", "day_cell")

    def __init__(
        self,
        entries: dict[bytes, Slot],
        days: dict[bytes, Slot],
        stale: set[bytes],
        touched: set[tuple[int, int]],
        extremes: dict[bytes, Extremes],
        day_cell: Callable[[bytes], Slot],
    ) -> None:
        self.entries = entries
        self.days = days
        self.stale = stale
        self.touched = touched
        self.extremes = extremes
        self.day_cell = day_cell  # the old day of a copy that moves days: not loaded


@dataclass(slots=True)
class Pending:
    """What the records applied since the last checkpoint wait for, per partition."""

    touched: dict[int, set[tuple[int, int]]] = field(default_factory=lambda: defaultdict(set))
    stale: dict[int, set[bytes]] = field(default_factory=lambda: defaultdict(set))
    next_offset: dict[int, int] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def rows(self) -> int:
        return sum(len(t) for t in self.touched.values())


@dataclass(slots=True)
class Snapshot:
    """What a checkpoint writes, taken at once: the records applied since the last one, the
    sessions they were applied in, and each table's changed keys (`TableCache.snapshot`)."""

    pending: Pending
    sessions: dict[int, Session]
    layers: dict[str, Layer]
    # Whether the rebalance count of the snapshot's time still holds (`still_assigned`).
    still_assigned: Callable[[], bool]
    # Partitions whose range starts below their session's `high`: a checkpoint that never
    # committed may have sent grant events and rows for it, which this one re-asserts.
    replaying: set[int] = field(default_factory=set)


class StateStage:
    def __init__(
        self,
        settings: Settings,
        entries: TableCache,
        days: TableCache,
        reader: PartitionReader,
        claims: Claims,
        confirm: Callable[[int, int], Awaitable[bool]],
        rebalance_count: Callable[[], int | None] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.entries = entries
        self.days = days
        self.caches = (entries, days)
        self.reader = reader
        self.claims = claims
        # Commits the group's own offset of a partition again: False unless this worker
        # still owns it in the group's current generation (Kafka checks the generation).
        self.confirm = confirm
        # How many rebalances the worker went through; None while one is in progress.
        self.rebalance_count = rebalance_count
        self.pending = Pending()
        self.sessions: dict[int, Session] = {}
        # Per partition, the extremes of days recomputed once (`state.StateView.extremes`):
        # true as of the records applied, so dropped with them.
        self.extremes: dict[int, dict[bytes, Extremes]] = defaultdict(dict)
        self.apply_lock = asyncio.Lock()  # `add`, `repair_tail` and a checkpoint's snapshot
        self._next_to_apply: dict[int, int] = {}
        self._checkpoint_from: dict[int, int] = {}  # where the next checkpoint's range begins
        self._last_applied: dict[int, float] = {}  # monotonic time, per partition
        self._assigned_at = time.monotonic()
        # Each outcome's result object (`state.COUNTED`) and its counter, looked up once.
        self._counters = [(c, metrics.RECORDS.labels(c.outcome.value)) for c in COUNTED]

    async def add(
        self,
        raw: bytes,
        partition: int,
        offset: int,
        token: Token,
        committed: int | None = None,
        received_ms: int | None = None,
    ) -> None:
        """Apply by-buyer message `offset`; `token` comes back from a checkpoint once safe.

        Every offset of a partition is applied in order, whatever the consumer delivers.
        Faust's consumer abandons a message when flow is suspended (rebalance, recovery)
        yet moves its read offset past it, and can commit past such a hole. So the first
        message after an assignment must be the lower of the table's next-offset mark and
        the group's `committed` offset, and each later one the next offset; a message that
        arrives past that first reads the ones in between back from Kafka and applies them.
        """
        async with self.apply_lock:
            expected = await self._expected(partition, committed)
            if offset < expected:  # applied and committed already (a redelivery)
                self.pending.tokens.append(token)
                return
            for o, value, ts in await self._read(partition, expected, offset):
                await self.apply(value, partition, o, ts)
            await self.apply(raw, partition, offset, received_ms)
            self._applied(partition, max(expected, offset + 1), token)

    async def repair_tail(self, partition: int, end: int, committed: int | None) -> None:
        """Apply a partition's messages up to `end` that the consumer moved past unseen.

        `add` notices such a hole only when a later message arrives; at the end of the
        input none does, and the partition would stay behind until new input came. So a
        partition that has applied nothing for QUIET_SECONDS while its log holds more reads
        the rest back itself; a flowing partition brings its own messages. Not while the
        sink is behind: during a database outage it would only pile up rows.
        """
        async with self.apply_lock:
            quiet = time.monotonic() - self._last_applied.get(partition, self._assigned_at)
            if quiet < QUIET_SECONDS or self.pending.rows() >= self.settings.max_pending_rows:
                return
            expected = await self._expected(partition, committed)
            if end <= expected:
                return
            still = self.still_assigned()
            values = await self._read(partition, expected, end, f"in {quiet:.0f} s, at its end")
            if not still():
                return  # a rebalance began meanwhile: the partition may be gone
            for o, value, ts in values:
                await self.apply(value, partition, o, ts)
            self._applied(partition, end, ReadBack(partition, end))

    def still_assigned(self) -> Callable[[], bool]:
        """Whether the partitions of now are still this worker's later (never while a
        rebalance runs): work begun under them is void once they may have moved."""
        count = self.rebalance_count()
        return lambda: count is not None and self.rebalance_count() == count

    async def snapshot(self) -> Snapshot:
        """Take what a checkpoint writes; records applied from here on belong to the next."""
        async with self.apply_lock:
            pending, self.pending = self.pending, Pending()
            layers = {cache.name: cache.snapshot() for cache in self.caches}
            replaying = set()
            for partition, end in pending.next_offset.items():
                if self._checkpoint_from.get(partition, end) < self.sessions[partition].high:
                    replaying.add(partition)
                self._checkpoint_from[partition] = end
            return Snapshot(pending, dict(self.sessions), layers, self.still_assigned(), replaying)

    def keep_extremes(self, partition: int, key: bytes, extremes: Extremes) -> None:
        """A recomputed day's extremes, kept from now on (the oldest go past MAX_KEPT_DAYS:
        a day without them is only recomputed again when it loses an extremum)."""
        kept = self.extremes[partition]
        kept.pop(key, None)
        if len(kept) >= MAX_KEPT_DAYS:
            del kept[next(iter(kept))]
        kept[key] = extremes

    def _applied(self, partition: int, next_offset: int, token: Token) -> None:
        self._next_to_apply[partition] = next_offset
        self._last_applied[partition] = time.monotonic()
        self.pending.next_offset[partition] = next_offset
        self.pending.tokens.append(token)

    async def _expected(self, partition: int, committed: int | None) -> int:
        """The next offset to apply (see `add`); the first one begins a session."""
        expected = self._next_to_apply.get(partition)
        if expected is None:
            expected = await self._begin(partition, committed)
        return expected

    async def _begin(self, partition: int, committed: int | None) -> int:
        """Claim the partition, then begin this worker's session of it at the committed offset.

        The claim comes first (`fencing`): from then on no older owner's write lands, so the
        offset read after it is the last any owner committed, unless this worker is itself
        the older owner: committing that offset again asks Kafka, which refuses a generation
        that is gone (`NotHeld`: no session begins, nothing is written). The session's start
        must be the offset the group has really committed: reading back from an earlier one
        would roll back values of committed checkpoints (`Versioned.as_of`). So it comes from
        the broker, not from the consumer's view.
        """
        marks = read_marks(partition, *self.days.store.get_many(partition, MARK_KEYS))
        mark = marks.next_offset
        s = self.settings
        wanted = self.still_assigned()  # not once a rebalance began: it may be gone
        if not wanted():
            raise NotHeld(partition, "a rebalance is running")

        try:
            await retry(
                partial(self.claims.claim, partition),
                wanted=wanted,
                failed=lambda exc, _: log.warning(
                    "partition %d not claimed, again: %r", partition, exc
                ),
            )
            broker = await retry(
                partial(self.reader.committed, s.app_id, s.by_buyer_topic, partition),
                wanted=wanted,
                failed=lambda exc, _: log.warning(
                    "committed offset of partition %d not read, again: %r", partition, exc
                ),
            )
            high = marks.high
            if s.policy is not None:
                high = await retry(
                    partial(self._high_since_restore, partition, high),
                    wanted=wanted,
                    failed=lambda exc, _: log.warning(
                        "changelog tail of partition %d not read, again: %r", partition, exc
                    ),
                )
        except GivenUp:
            raise NotHeld(partition, "a rebalance began while it was being claimed") from None
        if not await self.confirm(partition, broker or 0):
            raise NotHeld(partition, "the group's generation this worker joined is gone")
        if (broker or 0) != (committed or 0):
            log.warning(
                "%s[%d]: the consumer's committed offset %s is not the group's %s; "
                "starting from the group's",
                s.by_buyer_topic,
                partition,
                committed,
                broker,
            )
        # Nothing committed: the group starts at the log's beginning. A mark below the
        # committed offset means an offset was committed past messages never applied.
        start = min(mark or 0, broker or 0)
        log.info(
            "%s[%d]: session begins at %d (group committed %s, consumer %s, state mark %s)",
            s.by_buyer_topic,
            partition,
            start,
            broker,
            committed,
            mark,
        )
        sid = int.from_bytes(os.urandom(7), "big")
        self.sessions[partition] = Session(sid, start, high, marks.version_base)
        self._checkpoint_from[partition] = start
        self._next_to_apply[partition] = start
        return start

    async def _high_since_restore(self, partition: int, high: int) -> int:
        """The high mark, counting a checkpoint a former owner (or an abandoned checkpoint of
        this worker) committed to the changelog after the local copy was restored: its grant
        events are out, and the replay must re-assert them. After the claim none can commit,
        so the changelog's tail past the local copy is all there is to read (a few records,
        usually none)."""
        topic = self.days.changelog_topic
        restored = self.days.store.persisted_offset(partition)
        start = 0 if restored is None else restored + 1
        end = (await self.reader.end_offsets(topic, [partition])).get(partition, 0)
        for key, value in await self.reader.records(topic, partition, start, end):
            if key == HIGH_MARK_KEY and value is not None:
                high = max(high, int(value))
        return high

    async def _read(
        self, partition: int, start: int, end: int, when: str = "before a later one"
    ) -> list[tuple[int, bytes, int]]:
        """The messages in [start, end) the consumer did not deliver, from Kafka."""
        if start >= end:
            return []
        still = self.still_assigned()

        async def read() -> list[tuple[int, bytes, int]]:
            async with asyncio.timeout(READ_SECONDS):
                return await self.reader.read(self.settings.by_buyer_topic, partition, start, end)

        try:  # under the apply lock: never longer than the partition stays this worker's
            skipped = await retry(
                read,
                wanted=still,
                failed=lambda exc, delay: log.warning(
                    "partition %d: offsets %d..%d not read back, again in %.1f s: %r",
                    partition,
                    start,
                    end - 1,
                    delay,
                    exc,
                ),
            )
        except GivenUp:
            raise NotHeld(partition, "a rebalance began while messages were read back") from None
        metrics.SKIPPED_REAPPLIED.inc(len(skipped))
        log.warning(
            "%s[%d]: offsets %d..%d were not delivered by the consumer %s (%d message(s)); "
            "read back from Kafka and applied",
            self.settings.by_buyer_topic,
            partition,
            start,
            end - 1,
            when,
            len(skipped),
        )
        return skipped

    async def forget(self) -> list[Token]:
        """After a rebalance: drop unwritten changes and claims, start new sessions; return the
        tokens.

        The dropped messages were not committed, so whoever owns each partition next (maybe
        this worker again) applies them again from the committed offset. Under the apply
        lock, so that no message is half applied to caches that are being dropped.
        """
        async with self.apply_lock:
            tokens = self.pending.tokens
            self.pending = Pending()
            self.entries.drop()
            self.days.drop()
            self.extremes.clear()
            self.sessions.clear()
            await self.claims.release()
            self._next_to_apply.clear()
            self._checkpoint_from.clear()
            self._last_applied.clear()
            self._assigned_at = time.monotonic()
            return tokens

    # -- applying one message ---------------------------------------------------------------

    async def apply(self, raw: bytes, partition: int, offset: int, received_ms: int | None) -> None:
        """Apply one by-buyer message to the caches, in record order.

        Each record's keys are built once, for the multi-get and for `apply_row`; the
        outcomes are counted per message (bench/apply_micro.py measures this path).
        """
        session = self.sessions[partition]
        rows = decode_rows(raw)
        if self.settings.state_retention_days:
            rows = await self._retain(rows, partition, offset, session, received_ms)
        ekeys = [entry_key(r[BUYER], r[ORDER], r[STATUS]) for r in rows]
        dkeys = [day_key(r[BUYER], r[ROW_DAY]) for r in rows]
        days = self.days
        view = _View(
            self.entries.load(partition, ekeys, session),
            days.load(partition, dkeys, session),
            self.pending.stale[partition],
            self.pending.touched[partition],
            self.extremes[partition],
            lambda key: days.load(partition, [key], session)[key],
        )
        results = [apply_row(view, r, e, d) for r, e, d in zip(rows, ekeys, dkeys, strict=True)]
        counted = 0
        for result, counter in self._counters:
            n = results.count(result)
            if n:
                counter.inc(n)
                counted += n
        if counted < len(results):
            for row, result in zip(rows, results, strict=True):
                if result.outcome is Outcome.OVERFLOW:
                    self._dead_letter(row, partition, offset, result.reason, "overflow")
            metrics.RECORDS.labels(Outcome.OVERFLOW.value).inc(len(results) - counted)

    def _dead_letter(self, row: Row, partition: int, offset: int, reason: str, kind: str) -> None:
        """Set a row aside for the checkpoint to send (it awaits them with the changelogs)."""
        dead = DeadLetter(
            None, encode_rows([row]), self.settings.by_buyer_topic, partition, offset, reason, kind
        )
        self.pending.dead_letters.append(dead)

    # -- retention --------------------------------------------------------------------------

    async def _retain(
        self,
        rows: list[Row],
        partition: int,
        offset: int,
        session: Session,
        received_ms: int | None,
    ) -> list[Row]:
        """Dead-letter future and late records, advance the watermark, expire old days.

        The watermark (newest effect_time seen) lives in the days table, so it survives
        restarts and moves with the partition. A record dated more than
        COUPON_FUTURE_TOLERANCE_DAYS after the message reached intake cannot be a real
        payment yet, and must not close every day before it. A record older than the
        cutoff cannot be matched against dropped state: the closed day's row stays as it
        was. Both decisions depend only on the message, so a replay makes them again.
        """
        s = self.settings
        days = s.state_retention_days
        newest = latest_day(received_ms, s.future_tolerance_days) if received_ms else None
        meta = self.days.load(partition, [WATERMARK_KEY], session)[WATERMARK_KEY]
        mark = old_mark = meta[VALUE] or 0
        kept: list[Row] = []
        for row in rows:
            day = row[ROW_DAY]
            if newest is not None and day > newest:
                reason = (
                    f"effect_time {day} is more than {s.future_tolerance_days} day(s) after the "
                    f"record was received; with COUPON_STATE_RETENTION_DAYS={days} it would "
                    "close every day before it"
                )
                self._dead_letter(row, partition, offset, reason, "future")
                continue
            mark = max(mark, day)
            kept.append(row)
        cutoff = retention_cutoff(mark, days) if mark else 0
        if mark != old_mark:
            meta[VALUE] = mark
            if not old_mark or retention_cutoff(old_mark, days) < cutoff:
                self._expire(partition, session, cutoff)
        result = []
        for row in kept:
            if row[ROW_DAY] < cutoff:
                reason = (
                    f"effect_time {row[ROW_DAY]} is older than the retention cutoff {cutoff} "
                    f"(COUPON_STATE_RETENTION_DAYS={days}); the day is closed"
                )
                self._dead_letter(row, partition, offset, reason, "late")
            else:
                result.append(row)
        return result

    def _expire(self, partition: int, session: Session, cutoff: int) -> None:
        """Delete this partition's entries and days of days before `cutoff`."""
        old_days = [
            key
            for key, _ in self.days.items(partition, session)
            if is_day_key(key) and parse_day_key(key)[1] < cutoff
        ]
        old_entries = []
        kept = 0
        for key, value in self.entries.items(partition, session):
            if value is None:
                continue
            if value[DAY] < cutoff:
                old_entries.append(key)
            else:
                kept += 1
        for cache, keys in ((self.days, old_days), (self.entries, old_entries)):
            slots = cache.load(partition, keys, session)
            for key in keys:
                slots[key][VALUE] = None
        self.extremes.pop(partition, None)
        metrics.STATE_EXPIRED.inc(len(old_entries))
        metrics.STATE_ENTRIES.labels(str(partition)).set(kept)
        log.info(
            "partition %d: expired %d records and %d days before %d",
            partition,
            len(old_entries),
            len(old_days),
            cutoff,
        )
