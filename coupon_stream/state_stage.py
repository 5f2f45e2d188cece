"""The state stage: by-buyer batches -> buyers table (dedup) -> result rows (aggregate) -> sink.

One by-buyer message holds records of one partition. It is applied with one multi-get, one
RocksDB WriteBatch and one changelog record batch; the rows it touched are coalesced until the
next flush. A flush waits for the changelog, commits the rows, and only then hands back the
messages that may be acknowledged: no offset is committed ahead of the changelog or the table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from aiokafka.errors import KafkaError

from coupon_stream import metrics
from coupon_stream.kafka import DeadLetter, KafkaOut, PartitionReader
from coupon_stream.settings import Settings
from coupon_stream.sink import PendingWrites, ResultSink, RowKey
from coupon_stream.state import (
    DAY,
    BuyerState,
    Entry,
    ResultRow,
    apply_batch,
    buyer_key,
    decode_batch,
    encode_batch,
    retention_cutoff,
)
from coupon_stream.store import PartitionStore

log = logging.getLogger(__name__)

# Not decimal buyer ids, so they never collide with one.
WATERMARK_KEY = b"~watermark"
NEXT_OFFSET_KEY = b"~next-offset"  # the by-buyer offset after the last one applied
MAX_CHANGELOG_BACKOFF = 2.0

# A partition that delivered nothing for this long while its log holds more is read back.
QUIET_SECONDS = 10.0

# A changelog append not yet known delivered: (partition, keys, [(future, records)]), with
# None for the sends when Kafka refused the append outright.
_Unconfirmed = tuple[int, list[bytes], list[tuple[asyncio.Future, int]] | None]


class ReadBack(NamedTuple):
    """A flush token for messages applied without a consumer event: commit `next_offset`."""

    partition: int
    next_offset: int


class StateStage:
    def __init__(
        self,
        settings: Settings,
        store: PartitionStore,
        out: KafkaOut,
        sink: ResultSink,
        changelog_topic: str,
        reader: PartitionReader,
        assignment: Callable[[], int | None] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.out = out
        self.sink = sink
        self.changelog_topic = changelog_topic
        self.reader = reader
        # Which assignment the worker is in; None while a rebalance is in progress.
        self.assignment = assignment
        self.pending = PendingWrites()
        self._unconfirmed: list[_Unconfirmed] = []
        self._flush_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()  # `add` and `repair_tail` apply in offset order
        self._delivered: dict[int, int] = {}  # next offset to apply, per partition
        self._last_applied: dict[int, float] = {}  # monotonic time, per partition
        self._assigned_at = time.monotonic()

    async def add(
        self,
        raw: bytes,
        partition: int,
        offset: int,
        token: object,
        committed: int | None = None,
    ) -> None:
        """Apply by-buyer message `offset`; `token` comes back from `flush` once it is safe.

        Every offset of a partition is applied in order, whatever the consumer delivers.
        Faust's consumer abandons a message when flow is suspended (rebalance, recovery)
        yet moves its read offset past it, and can commit past such a hole. So the first
        message after an assignment must be the lower of the table's next-offset mark and
        the group's `committed` offset, and each later one the next offset; a message that
        arrives past that first reads the ones in between back from Kafka and applies them.
        """
        async with self._apply_lock:
            expected = self._expected(partition, committed)
            rows = await self._apply_all(partition, await self._read(partition, expected, offset))
            rows.update(await self.apply(raw, partition, offset))
            self._delivered[partition] = max(expected, offset + 1)
            self._last_applied[partition] = time.monotonic()
            self.pending.add(rows, token)

    async def repair_tail(self, partition: int, end: int, committed: int | None) -> None:
        """Apply a partition's messages up to `end` that the consumer moved past unseen.

        `add` notices such a hole only when a later message arrives; at the end of the
        input none does, and the partition would stay behind until new input came. So a
        partition that has applied nothing for QUIET_SECONDS while its log holds more reads
        the rest back itself; a flowing partition brings its own messages. Not while the
        sink is behind: during a database outage it would only pile up rows.
        """
        async with self._apply_lock:
            quiet = time.monotonic() - self._last_applied.get(partition, self._assigned_at)
            if quiet < QUIET_SECONDS or len(self.pending.rows) >= self.settings.max_pending_rows:
                return
            expected = self._expected(partition, committed)
            if end <= expected:
                return
            assignment = self.assignment()
            values = await self._read(partition, expected, end, f"in {quiet:.0f} s, at its end")
            if assignment is None or self.assignment() != assignment:
                return  # a rebalance began meanwhile: the partition may be gone
            rows = await self._apply_all(partition, values)
            self._delivered[partition] = end
            self._last_applied[partition] = time.monotonic()
            self.pending.add(rows, ReadBack(partition, end))

    def _expected(self, partition: int, committed: int | None) -> int:
        """The next offset to apply (see `add`)."""
        expected = self._delivered.get(partition)
        if expected is None:
            # Nothing committed means the group starts at the log's beginning.
            (mark,) = self.store.get_many(partition, [NEXT_OFFSET_KEY])
            expected = min(int(mark or 0), committed or 0)
        return expected

    async def _apply_all(
        self, partition: int, messages: list[tuple[int, bytes]]
    ) -> dict[RowKey, ResultRow | None]:
        rows: dict[RowKey, ResultRow | None] = {}
        for offset, value in messages:
            rows.update(await self.apply(value, partition, offset))
        return rows

    async def _read(
        self, partition: int, start: int, end: int, when: str = "before a later one"
    ) -> list[tuple[int, bytes]]:
        """The messages in [start, end) the consumer did not deliver, from Kafka."""
        if start >= end:
            return []
        skipped = await self.reader.read(self.settings.by_buyer_topic, partition, start, end)
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

    def forget_deliveries(self) -> None:
        """After a rebalance, positions restart from the committed offsets."""
        self._delivered.clear()
        self._last_applied.clear()
        self._assigned_at = time.monotonic()

    async def apply(
        self, raw: bytes, partition: int, offset: int
    ) -> dict[RowKey, ResultRow | None]:
        """Apply one by-buyer message to the table; return the result rows it touched.

        Every buyer in the message is written back (and sent to the changelog) even if only
        duplicates arrived: see `state.apply_batch` for why.
        """
        batch = decode_batch(raw)
        if self.settings.state_retention_days:
            batch = await self._retain(batch, partition)
        keys = {b: buyer_key(b) for b, _ in batch}
        *values, mark = self.store.get_many(partition, [*keys.values(), NEXT_OFFSET_KEY])
        stored = dict(zip(keys, values, strict=True))
        result = apply_batch(batch, lambda b: BuyerState.decode(b, stored[b]))
        writes = {keys[b]: s.encode() if s.kept else None for b, s in result.states.items()}
        writes[NEXT_OFFSET_KEY] = str(max(offset + 1, int(mark or 0))).encode()
        await self._write(partition, writes)
        metrics.STATE_BUYERS_WRITTEN.inc(len(result.states))
        for outcome, n in result.outcomes.items():
            metrics.RECORDS.labels(outcome.value).inc(n)
        return result.rows

    async def _write(self, partition: int, writes: dict[bytes, bytes | None]) -> None:
        if not writes:
            return
        self.store.write(partition, writes)
        try:
            sent = await self.out.send_records(self.changelog_topic, partition, writes.items())
        except KafkaError as exc:
            # Not appended (e.g. no leader for longer than the request timeout); the flush
            # sends the keys' current values before anything is acknowledged.
            metrics.CHANGELOG_RETRIES.inc()
            log.error(
                "changelog %s[%d] append refused, sending it again at the next flush: %r",
                self.changelog_topic,
                partition,
                exc,
            )
            sent = None
        self._unconfirmed.append((partition, list(writes), sent))

    # -- flush ------------------------------------------------------------------------------

    async def flush(self) -> tuple[list[object], bool]:
        """Confirm the changelog, commit the rows; return the tokens to acknowledge, and
        whether their offsets may be committed.

        One flush at a time keeps the writes of a key in order. If the database is down
        during a rebalance, the write is given up rather than retried: the partitions may
        move, and a write landing after their next owner's would put older values back.
        Its messages are neither acknowledged nor committed, so the next owner (maybe this
        worker again) replays them, and a replay re-sends each touched key's current values.
        """
        async with self._flush_lock:
            rows, tokens = self.pending.take()
            unconfirmed, self._unconfirmed = self._unconfirmed, []
            if not tokens:
                return [], True
            assignment = self.assignment()
            offsets = await self._confirm_changelog(unconfirmed)
            written = await self.sink.write(
                rows,
                still_wanted=lambda: assignment is not None and self.assignment() == assignment,
            )
            if not written:
                log.warning(
                    "the database was down during a rebalance: %d rows of %d messages left "
                    "to their partitions' next owner, which replays the messages",
                    len(rows),
                    len(tokens),
                )
            for partition, offset in offsets.items():
                self.store.persist_offset(partition, offset)  # the local state holds them
            self.pending.written()
            return tokens, written

    async def _confirm_changelog(self, unconfirmed: Sequence[_Unconfirmed]) -> dict[int, int]:
        """Wait for every changelog send; re-send what failed until Kafka takes it.

        A re-send reads the keys' current values, never the failed ones: a newer value of the
        key may already be in the changelog, and the older one must not land after it.
        """
        offsets: dict[int, int] = {}
        delay = 0.1
        for partition, keys, sent in unconfirmed:
            while True:
                try:
                    if sent is None:
                        current = zip(keys, self.store.get_many(partition, keys), strict=True)
                        sent = await self.out.send_records(self.changelog_topic, partition, current)
                    for meta, n in zip(
                        await asyncio.gather(*(f for f, _ in sent)),
                        (n for _, n in sent),
                        strict=True,
                    ):
                        last = meta.offset + n - 1  # a batch's metadata has its first offset
                        offsets[partition] = max(offsets.get(partition, -1), last)
                    break
                except KafkaError as exc:
                    metrics.CHANGELOG_RETRIES.inc()
                    log.error(
                        "changelog %s[%d] send failed, re-sending %d keys in %.1f s: %r",
                        self.changelog_topic,
                        partition,
                        len(keys),
                        delay,
                        exc,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_CHANGELOG_BACKOFF)
                    sent = None
        return offsets

    # -- bounded state ----------------------------------------------------------------------

    async def _retain(
        self, batch: list[tuple[int, Entry]], partition: int
    ) -> list[tuple[int, Entry]]:
        """Advance this partition's watermark, expire old days, dead-letter late records.

        The watermark (newest effect_time seen) lives in the table itself, so it survives
        restarts and moves with the partition. A record older than the retention cutoff
        cannot be matched against dropped state, so it is dead-lettered instead of counted:
        the closed day's row stays as it was.
        """
        if not batch:
            return batch
        days = self.settings.state_retention_days
        (stored,) = self.store.get_many(partition, [WATERMARK_KEY])
        old_mark = int(stored or 0)
        mark = max(old_mark, max(c[DAY] for _, c in batch))
        cutoff = retention_cutoff(mark, days)
        if mark != old_mark:
            # Written before the batch is applied, so the batch loads already-expired buyers.
            writes: dict[bytes, bytes | None] = {WATERMARK_KEY: str(mark).encode()}
            if not old_mark or retention_cutoff(old_mark, days) < cutoff:
                writes.update(self._expire(cutoff, partition))
            await self._write(partition, writes)
        kept = [(b, c) for b, c in batch if c[DAY] >= cutoff]
        late: list[Any] = []
        for buyer_id, c in batch:
            if c[DAY] < cutoff:
                reason = (
                    f"effect_time {c[DAY]} is older than the retention cutoff {cutoff} "
                    f"(COUPON_STATE_RETENTION_DAYS={days}); the day is closed"
                )
                record = encode_batch([(buyer_id, c)])
                dead = DeadLetter(
                    None, record, self.settings.by_buyer_topic, partition, -1, reason, "late"
                )
                late.append(await self.out.dead_letter(dead))
        await asyncio.gather(*late)
        return kept

    def _expire(self, cutoff: int, partition: int) -> dict[bytes, bytes | None]:
        """New values of this partition's buyers that held records of days before `cutoff`."""
        writes: dict[bytes, bytes | None] = {}
        dropped = entries = 0
        for key, value in self.store.items(partition):
            if key in (WATERMARK_KEY, NEXT_OFFSET_KEY):
                continue
            state = BuyerState.decode(int(key), value)
            n = state.drop_days_before(cutoff)
            entries += len(state.kept)
            if n:
                dropped += n
                writes[key] = state.encode() if state.kept else None
        metrics.STATE_EXPIRED.inc(dropped)
        metrics.STATE_ENTRIES.labels(str(partition)).set(entries)
        log.info(
            "partition %d: expired %d records of days before %d; %d records kept",
            partition,
            dropped,
            cutoff,
            entries,
        )
        return writes
