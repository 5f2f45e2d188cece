"""`coupon-stream rescale`: an app's state moved to a new app id with another partition count.

Faust, Kafka Streams and Quix Streams refuse a change of partition count; Flink rescales
through a savepoint because its state is split in key groups. Here every state key starts
with its buyer, so the state of the old partitions can be routed again: each key goes to
`partition_for_buyer(buyer, Q)`, the partition its buyer's records will arrive in.

It is offline, like Flink's stop-with-savepoint: the old app's workers are stopped, and the
old by-buyer topic fully applied. The order, each step safe to run again:

1. Refuse while a member is in either of the old app's groups, while the old by-buyer topic
   has lag (forwarded records the state stage has not applied would be lost), or when the
   new app id holds state this rescale did not write.
2. Retire the old app: claim every one of its partitions (docs/design.md, "Fencing"), so
   that none of its workers, not even one frozen past its session, writes again.
3. Mark the new app's `<new app id>-rescale` topic: this rescale, from where, to how many.
4. Create the new app's by-buyer topic and changelogs, Q partitions each.
5. Per old partition, both changelogs read to their end, each key's last value read as of
   the state group's committed offset (as a takeover reads it: `Versioned.as_of`), written
   to its new partition as a value at by-buyer offset 0; then the partition is marked done.
6. Each new partition's metadata: the state format, next by-buyer offset 0 (the new topic
   is empty), the newest watermark of the old partitions (retention).
7. The new intake group's committed offsets on the input topics = the old intake group's.
8. Marked finished.

Killed anywhere, the same command goes on: partitions marked done are skipped, a partition
cut short is written again (the later copy of a key is the same value), steps 6 to 8 are
idempotent. The result rows are left alone: they are right, and the new workers keep them right.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from coupon_stream.connectors import clients, deployment
from coupon_stream.connectors.clients import TopicPartition
from coupon_stream.connectors.faults import for_code
from coupon_stream.connectors.kafka import (
    ChangelogWriter,
    KafkaOut,
    NewTopic,
    PartitionReader,
    behind,
    commit_offsets,
    create_topics,
)
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.core.records import partition_for_buyer
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.core.stored import (
    BUYER_BYTES,
    MARK_KEYS,
    META_KEYS,
    WATERMARK_KEY,
    at_start,
    buyer_of_key,
    read_marks,
    read_value,
    rebased,
    start_marks,
)
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.fencing import Claims
from coupon_stream.tools import status

log = logging.getLogger(__name__)

MARK_KEY = b"rescale"
MAX_PROCESSES = 8
# Buyers whose new partition a process keeps at hand, and record batches it lets wait for
# Kafka's acknowledgement: what bounds a rescale's memory, whatever the state's size.
ROUTES_CACHED = 1 << 16
IN_FLIGHT_BATCHES = 4096
# Records written, the old partition's watermark value, the last grant version it may have
# sent (`stored.VERSION_BASE_KEY`).
Moved = tuple[int, Any, int]


class RescaleUnsafe(RuntimeError):
    """The rescale would lose or mix state; the message says what to do instead."""


@dataclass
class Mark:
    """The rescale's progress, kept in the new app's `<app id>-rescale` topic."""

    source: str
    source_partitions: int
    partitions: int
    done: list[int] = field(default_factory=list)
    # Per old partition done: what it was moved as of (`positions`), as JSON keys.
    moved: dict[str, list[int]] = field(default_factory=dict)
    records: int = 0
    watermark: int | None = None  # the newest effect_time of the old partitions (retention)
    version_base: int = 0  # above every grant version the old partitions may have sent
    finished: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: bytes) -> Mark:
        return cls(**orjson.loads(raw))


def target(settings: Settings, app_id: str, partitions: int) -> Settings:
    """The new app's settings: the old ones with another app id and partition count,
    validated as a worker would validate them (RescaleUnsafe, naming the argument)."""
    values = {name: getattr(settings, name) for name in Settings.model_fields}
    try:
        return Settings.model_validate(values | {"app_id": app_id, "partitions": partitions})
    except ValidationError as exc:
        (error, *_) = exc.errors()
        where = {"app_id": "--to-app-id", "partitions": "--partitions"}.get(
            ".".join(map(str, error["loc"])), "the settings"
        )
        raise RescaleUnsafe(f"{where}: {error['msg']}") from None


def mark_topic(settings: Settings) -> str:
    return f"{settings.app_id}-rescale"


async def rescale(
    settings: Settings,
    partitions: int,
    to_app_id: str,
    say: Callable[[str], None] | None = None,
) -> Mark:
    """Run (or go on with) the rescale of `settings.app_id` to `to_app_id`; the final mark."""
    say = say or (lambda line: print(line, flush=True))  # progress, even into a pipe
    # Every argument is checked before anything is written anywhere.
    old, new = settings, target(settings, to_app_id, partitions)
    if new.app_id == old.app_id:
        raise RescaleUnsafe("--to-app-id must differ from COUPON_APP_ID")
    began = time.monotonic()
    try:  # the old app's topics must have the partition count its settings say
        await deployment.check_deployment(old)
    except deployment.DeploymentError as exc:
        raise RescaleUnsafe(str(exc)) from None
    await check_idle(old)
    await retire(old)
    mark = await claim(old, new)
    if mark.finished:
        say(f"{old.app_id} was already rescaled to {new.app_id} ({mark.records} records)")
        return mark
    await deployment.create_internal_topics(new)
    committed = await state_committed(old)
    now = await positions(old, committed)
    check_not_moved_since(old, new, mark, now)
    left = [p for p in range(old.partitions) if p not in mark.done]
    out = KafkaOut(new)
    # CPU-bound (the records' bytes pass through Python): a process per core, each moving
    # one old partition at a time.
    processes = max(1, min(len(left), os.cpu_count() or 1, MAX_PROCESSES))
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        loop = asyncio.get_running_loop()
        running = {
            loop.run_in_executor(pool, move_in_process, old, new, p, committed.get(p, 0)): p
            for p in left
        }
        started, moved_now = time.monotonic(), 0
        while running:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for job in finished:
                p = running.pop(job)
                moved, watermark, reached = job.result()
                mark.version_base = max(mark.version_base, reached + 1)
                mark.done.append(p)
                mark.moved[str(p)] = now[p]
                mark.records += moved
                moved_now += moved
                mark.watermark = newest(mark.watermark, watermark)
                await write_mark(out, new, mark)
                seconds = time.monotonic() - started
                say(
                    f"old partition {p}: {moved} records moved ({len(mark.done)}/"
                    f"{old.partitions} done, {seconds:.1f} s, "
                    f"{moved_now / seconds if seconds else 0:.0f} records/s)"
                )
        await write_meta(out, new, mark)
        await copy_intake_offsets(old, new)
        mark.finished = True
        await write_mark(out, new, mark)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        await out.stop()
    seconds = time.monotonic() - began
    say(
        f"moved {mark.records} records from {old.app_id} ({old.partitions} partitions) to "
        f"{new.app_id} ({new.partitions} partitions) in {seconds:.1f} s. Start the new "
        f"workers with COUPON_APP_ID={new.app_id} COUPON_PARTITIONS={new.partitions} "
        "(and the other settings unchanged): coupon-stream worker"
    )
    return mark


async def retire(old: Settings) -> None:
    """Claim every partition of the old app, and keep none: no worker of it writes again.

    One that froze past its session timeout is no member any more, so the live-member check
    cannot see it; woken, its changelog appends and result rows are fenced like those of
    any older owner (docs/design.md, "Fencing"), and its open transactions are aborted
    before the changelogs are read.
    """
    sink = ResultSink.of(old)
    await sink.start()
    try:
        await Claims(ChangelogWriter(old), sink).retire(range(old.partitions))
    finally:
        await sink.stop()


def live_groups(described: list[tuple[Any, ...]]) -> list[str]:
    """The groups of a DescribeGroups response that have members: (error code, group,
    state, protocol type, protocol, members, ...) each. A group the coordinator could not
    describe (loading, moved, not authorized) has no members listed but may have some:
    RescaleUnsafe, with the broker's reason."""
    for code, group, *_ in described:
        if code:
            error = for_code(code)
            raise RescaleUnsafe(
                f"consumer group {group} could not be described ({error.__name__}: "
                f"{error.description}); whether a worker of it is still running is unknown. "
                "Run the same command again in a moment"
            )
    return [g[1] for g in described if g[5]]


async def positions(old: Settings, committed: dict[int, int]) -> dict[int, list[int]]:
    """Per old partition, what a move of it is as of: the state group's committed offset and
    both changelogs' end offsets. The old app is stopped and retired, so they stay put
    unless its workers run again."""
    topics = [old.changelog_topics[t] for t in STATE_TABLES]
    ends = await status.end_offsets_by_topic(old, topics)
    return {
        p: [committed.get(p, 0), *(ends[t].get(p, 0) for t in topics)]
        for p in range(old.partitions)
    }


def check_not_moved_since(
    old: Settings, new: Settings, mark: Mark, now: dict[int, list[int]]
) -> None:
    """A resumed rescale trusts a partition it moved only if the source is where it was then.

    Between two runs an operator may start the old app's workers again (to end the
    downtime) and stop them: the partitions moved before hold an older state than the ones
    moved after, and than the intake offsets copied at the end. Redoing them would leave the
    keys deleted since in the new changelogs, so the rescale is refused, saying which moved.
    """
    since = [
        f"{p} (committed offset, changelog ends then {mark.moved.get(str(p))}, now {now[p]})"
        for p in sorted(mark.done)
        if mark.moved.get(str(p)) != now[p]
    ]
    if since:
        raise RescaleUnsafe(
            f"the workers of {old.app_id} have run since this rescale into {new.app_id} "
            f"began: old partition(s) {'; '.join(since)} moved since they were copied. "
            f"{new.app_id} holds a stale copy of them: rescale into another --to-app-id"
        )


async def check_idle(old: Settings) -> None:
    admin = clients.admin(old)
    await admin.start()
    try:
        live = []
        for group in (old.app_id, old.intake_group):
            # One group a request: aiokafka misreads a response describing several.
            (described,) = await admin.describe_consumer_groups([group])
            live += live_groups(described.groups)
    finally:
        await admin.close()
    if live:
        raise RescaleUnsafe(
            f"consumer group(s) {', '.join(live)} still have members: stop every worker of "
            f"{old.app_id} first (a rescale reads a state no worker changes)"
        )
    lag = await by_buyer_lag(old)
    if any(lag.values()):
        behind_by = ", ".join(f"{p}: {n}" for p, n in sorted(lag.items()) if n)
        raise RescaleUnsafe(
            f"{old.by_buyer_topic} has records the state stage has not applied (partition: "
            f"lag {behind_by}); they would be lost. Start the workers until `coupon-stream "
            f"status` shows no lag on {old.by_buyer_topic}, then stop them"
        )


async def by_buyer_lag(old: Settings) -> dict[int, int]:
    ends = await status.end_offsets(old, old.by_buyer_topic)
    committed = await state_committed(old)
    return {p: behind(end, committed.get(p)) for p, end in ends.items()}


async def group_offsets(settings: Settings, group: str) -> dict[TopicPartition, int]:
    """The offsets `group` has committed, from the broker (none: left out)."""
    admin = clients.admin(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {
        TopicPartition(tp.topic, tp.partition): meta.offset
        for tp, meta in offsets.items()
        if meta.offset >= 0
    }


async def state_committed(settings: Settings) -> dict[int, int]:
    """The state group's committed offset per by-buyer partition (absent: none)."""
    offsets = await group_offsets(settings, settings.app_id)
    return {tp.partition: o for tp, o in offsets.items() if tp.topic == settings.by_buyer_topic}


async def claim(old: Settings, new: Settings) -> Mark:
    """This rescale's mark in the new app id: found (a run to go on with) or written.

    Refused when the new app id holds anything else: state topics without a mark, a mark of
    another rescale, or a state group that has committed (its workers have run since).
    """
    found = await read_mark(new)
    wanted = Mark(old.app_id, old.partitions, new.partitions)
    if found is not None:
        same = (found.source, found.source_partitions, found.partitions) == (
            wanted.source,
            wanted.source_partitions,
            wanted.partitions,
        )
        if not same:
            raise RescaleUnsafe(
                f"{new.app_id} holds a rescale of {found.source} ({found.source_partitions} "
                f"partitions) to {found.partitions} partitions; choose another --to-app-id"
            )
        if await state_committed(new):
            raise RescaleUnsafe(
                f"workers of {new.app_id} have run since its rescale: its state is its own now"
            )
        return found
    topics = [new.by_buyer_topic, *new.changelog_topics.values()]
    existing = await status.end_offsets_by_topic(new, topics)
    if any(existing.values()) or await state_committed(new):
        held = ", ".join(t for t, ends in existing.items() if ends) or "committed offsets"
        raise RescaleUnsafe(
            f"{new.app_id} already holds state ({held}); a rescale writes only into a new "
            "app id: choose another --to-app-id"
        )
    compact = {"cleanup.policy": "compact"}
    topic = NewTopic(mark_topic(new), 1, new.replication_factor, topic_configs=compact)
    await create_topics(new, [topic])
    out = KafkaOut(new)
    try:
        await write_mark(out, new, wanted)
    finally:
        await out.stop()
    return wanted


async def read_mark(new: Settings) -> Mark | None:
    topic = mark_topic(new)
    ends = (await status.end_offsets_by_topic(new, [topic]))[topic]
    if not ends or not ends.get(0):
        return None
    reader = PartitionReader(new)
    try:
        records = await reader.read(topic, 0, 0, ends[0])
    finally:
        await reader.stop()
    return Mark.decode(records[-1][1]) if records else None


async def write_mark(out: KafkaOut, new: Settings, mark: Mark) -> None:
    fut = await out.send(mark_topic(new), mark.encode(), key=MARK_KEY, partition=0)
    await fut


def move_in_process(old: Settings, new: Settings, partition: int, committed: int) -> Moved:
    """`move_partition` in a process of the rescale's pool, with clients of its own."""

    async def move() -> Moved:
        reader, out = PartitionReader(old), KafkaOut(new)
        try:
            return await move_partition(reader, out, old, new, partition, committed)
        finally:
            await reader.stop()
            await out.stop()

    return asyncio.run(move())


async def move_partition(
    reader: PartitionReader,
    out: KafkaOut,
    old: Settings,
    new: Settings,
    partition: int,
    committed: int,
) -> Moved:
    """Route one old partition's changelogs, record by record in log order, to the new
    partitions; the records written and the partition's watermark value (or None).

    Every record of a key goes to one new partition, in the order of the old log, so each
    key ends with its last value, as in the old one: no key needs to be held in memory.
    """
    written = 0
    watermark = None
    raw_marks: dict[bytes, bytes] = {}
    sent: list[tuple[asyncio.Future[Any], int]] = []

    # A buyer's key prefix -> its new partition. A buyer's keys mostly come together, so the
    # map is emptied when full: bounded whatever the number of buyers, and a plain dict.
    routes: dict[bytes, int] = {}

    for table in STATE_TABLES:
        topic = old.changelog_topics[table]
        end = (await reader.end_offsets(topic, [partition])).get(partition, 0)
        async for _, records, _ in reader.batches(topic, {partition: (0, end)}):
            routed: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
            for r in records:
                key = r.key
                if key in META_KEYS:
                    if key == WATERMARK_KEY and r.value is not None:
                        watermark = read_value(r.value, committed)
                    elif r.value is not None:
                        raw_marks[key] = r.value
                    continue
                value = None if r.value is None else rebased(r.value, committed)
                q = routes.get(prefix := key[:BUYER_BYTES])
                if q is None:
                    if len(routes) >= ROUTES_CACHED:
                        routes.clear()
                    q = routes[prefix] = partition_for_buyer(buyer_of_key(key), new.partitions)
                routed[q].append((key, value))
            for q, items in routed.items():
                sent += await out.send_records(new.changelog_topics[table], q, items)
                written += len(items)
            if len(sent) >= IN_FLIGHT_BATCHES:  # their records are freed once acknowledged
                await asyncio.gather(*(f for f, _ in sent))
                sent.clear()
    await asyncio.gather(*(f for f, _ in sent))
    marks = read_marks(partition, *(raw_marks.get(k) for k in MARK_KEYS))
    return written, watermark, marks.version_base + max(marks.high, committed)


def newest(a: int | None, b: int | None) -> int | None:
    """The later of two watermarks (the newest effect_time a partition saw, as the state
    stage stores it: an int), None if neither."""
    if a is None or (b is not None and b > a):
        return b
    return a


async def write_meta(out: KafkaOut, new: Settings, mark: Mark) -> None:
    """Each new partition's metadata keys in its days changelog."""
    meta = list(start_marks(mark.version_base).items())
    if mark.watermark is not None:
        meta.append((WATERMARK_KEY, at_start(mark.watermark)))
    sent = []
    for q in range(new.partitions):
        sent += await out.send_records(new.changelog_topics["days"], q, meta)
    await asyncio.gather(*(f for f, _ in sent))


async def copy_intake_offsets(old: Settings, new: Settings) -> None:
    """The new intake group goes on where the old one stopped on the input topics."""
    offsets = await group_offsets(old, old.intake_group)
    if not offsets:
        return
    await commit_offsets(new, new.intake_group, offsets)
