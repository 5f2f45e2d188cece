"""Operator views from outside the worker: consumer lag, dead letters, table size, topics.

Also the start-up checks (`check_deployment`) that refuse a deployment the worker would
silently get wrong.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from coupon_stream.connectors import clients, engine
from coupon_stream.connectors.kafka import behind
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.core.stored import STATE_FORMAT
from coupon_stream.foundation.errors import Backoff, retry
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.sink import ResultSink

T = TypeVar("T")


async def _operator_call(call: Callable[[], Awaitable[T]]) -> T:
    """An operator's one-shot call: retries a fresh cluster's missing group coordinator for
    a minute, not an outage for ever."""
    return await retry(call, timeout=60.0, backoff=Backoff(0.2, 1.0))


@dataclass
class Status:
    lag: dict[TopicPartition, int]
    dead_letters: int
    rows: int | None
    pending_sink_rows: float | None

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


async def partitions_of(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    found = await engine.topic_partitions(consumer, topics)
    return [TopicPartition(t, p) for t in topics for p in sorted(found[t])]


async def lag(settings: Settings) -> tuple[dict[TopicPartition, int], int]:
    """Uncommitted messages per partition (intake and state groups), and dead letters so far."""
    consumer = clients.consumer(settings)
    admin = clients.admin(settings)
    await consumer.start()
    await admin.start()
    try:
        groups = {
            settings.intake_group: [settings.orders_topic, settings.refunds_topic],
            settings.app_id: [settings.by_buyer_topic],
        }
        dlq = await partitions_of(consumer, [settings.dlq_topic])
        lags: dict[TopicPartition, int] = {}
        for group, topics in groups.items():
            tps = await partitions_of(consumer, topics)
            if not tps:
                continue
            ends = await consumer.end_offsets(tps)
            committed = await _operator_call(partial(admin.list_consumer_group_offsets, group))
            for tp in tps:
                lags[tp] = behind(ends[tp], committed[tp].offset if tp in committed else None)
        dead = sum((await consumer.end_offsets(dlq)).values()) if dlq else 0
        return lags, dead
    finally:
        await admin.close()
        await consumer.stop()


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's end offset (empty if the topic does not exist)."""
    return (await end_offsets_by_topic(settings, [topic]))[topic]


async def end_offsets_by_topic(settings: Settings, topics: list[str]) -> dict[str, dict[int, int]]:
    """Topic -> partition -> end offset, with one connection; a missing topic maps to {}."""
    consumer = clients.consumer(settings)
    try:
        await consumer.start()
        tps = await partitions_of(consumer, topics)
        ends = await consumer.end_offsets(tps) if tps else {}
        out: dict[str, dict[int, int]] = {t: {} for t in topics}
        for tp, end in ends.items():
            out[tp.topic][tp.partition] = end
        return out
    finally:
        await consumer.stop()


async def records_in(settings: Settings, topic: str) -> int:
    """Offsets ever used in a topic (end offsets summed): its records, and in a transactional
    topic (the changelogs) a marker per transaction too; compaction may have removed some."""
    return sum((await end_offsets(settings, topic)).values())


def _pending_from_metrics(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith("coupon_sink_pending_rows "):
            return float(line.split()[1])
    return None


async def collect(settings: Settings) -> Status:
    lags, dead = await lag(settings)
    sink = ResultSink.of(settings)
    sink.max_backoff = 0.5
    rows: int | None
    try:
        await asyncio.wait_for(sink.start(), 10)
        rows = len(await sink.fetch_all())
    except (TimeoutError, OSError):
        rows = None
    finally:
        await sink.stop()
    return Status(lags, dead, rows, _pending_from_metrics(settings.web_port))


def render(settings: Settings, status: Status) -> str:
    lines = [f"{'topic':<48} {'partition':>9} {'lag':>10}"]
    lines += [f"{tp.topic:<48} {tp.partition:>9} {n:>10}" for tp, n in sorted(status.lag.items())]
    lines.append(f"{'total lag':<48} {'':>9} {status.total_lag:>10}")
    pending = "n/a (worker web port not reachable)"
    if status.pending_sink_rows is not None:
        pending = f"{status.pending_sink_rows:.0f}"
    rows = "n/a (database not reachable)" if status.rows is None else str(status.rows)
    lines += [
        f"pending sink writes (worker on :{settings.web_port}): {pending}",
        f"rows in {settings.result_table}: {rows}",
        f"dead letters in {settings.dlq_topic}: {status.dead_letters}",
    ]
    return "\n".join(lines)


async def wait_idle(settings: Settings, timeout: float) -> float | None:
    """Wait until the group has no lag on two checks in a row (all input applied and written).

    Returns the monotonic time of the first of those checks (when the input was drained, to
    within a check), or None if `timeout` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    drained: float | None = None
    while time.monotonic() < deadline:
        checked = time.monotonic()
        lags, _ = await lag(settings)
        has_state = any(tp.topic == settings.by_buyer_topic for tp in lags)
        if not has_state or any(lags.values()):
            drained = None
        elif drained is None:
            drained = checked
        else:
            return drained
        await asyncio.sleep(1.0)
    return None


async def create_input_topics(settings: Settings, partitions: int) -> list[str]:
    topics = (settings.orders_topic, settings.refunds_topic)
    return await create_topics(
        settings, [NewTopic(t, partitions, settings.replication_factor) for t in topics]
    )


async def create_internal_topics(settings: Settings) -> list[str]:
    """The by-buyer topic, the tables' changelogs and the dead-letter topic.

    Created before Faust starts: when Faust creates them itself, its first partition
    assignment can run before the new topic is in the metadata ("Ignoring missing topic"),
    and partitions assigned by the next rebalance were seen never to be processed.
    """
    p, rf = settings.partitions, settings.replication_factor
    return await create_topics(
        settings,
        [
            NewTopic(settings.by_buyer_topic, p, rf),
            # Created on first use it would cost an ERROR line ("not found in cluster
            # metadata"), and on a broker with auto-creation off it would never exist.
            NewTopic(settings.dlq_topic, 1, rf),
            *(
                NewTopic(topic, p, rf, topic_configs=CHANGELOG_CONFIG)
                for topic in settings.changelog_topics.values()
            ),
        ],
    )


# A restore reads every record of a changelog partition past the local copy's offset (the
# bulk restore: its time is records / rate, docs/performance.md), and Kafka compacts only
# closed segments. Every checkpoint rewrites each key it touches, so with the broker's
# default segments (1 GiB) a partition held several copies of most keys; small segments
# let the cleaner keep it near one record per key.
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "segment.bytes": str(16 * 1024 * 1024),
    "segment.ms": str(60 * 60 * 1000),
}


async def create_topics(settings: Settings, topics: list[NewTopic]) -> list[str]:
    admin = clients.admin(settings)
    await admin.start()
    created = []
    try:
        response = await _operator_call(lambda: admin.create_topics(topics))
        for topic, code, *_ in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TopicAlreadyExistsError.errno:
                raise for_code(code)(topic)  # classified like any Kafka error
    finally:
        await admin.close()
    return created


# -- start-up checks ---------------------------------------------------------------------


class DeploymentError(RuntimeError):
    """The deployment cannot run as configured; the message tells the operator what to do."""


def legacy_state_dirs(data_dir: Path) -> list[Path]:
    """Local RocksDB tables of the format-1 `buyers` table (one value per buyer).

    Faust keeps table partitions at `<data_dir>/v<app version>/tables/<table>-<n>.db`.
    """
    return sorted(data_dir.glob("v*/tables/buyers-*.db"))


def _legacy_message(found: list[str]) -> str:
    return (
        f"state in format 1 (one value per buyer) found: {'; '.join(found)}. This version keeps "
        f"state format {STATE_FORMAT} ({' and '.join(STATE_TABLES)} tables) and cannot read it. "
        "To migrate: start with a new COUPON_APP_ID and an empty COUPON_DATA_DIR; the new "
        "consumer groups replay the input from the start (the input topics' retention must "
        "still hold it). Point readers at a new COUPON_RESULT_TABLE, or truncate the result "
        "table first."
    )


def _partition_message(settings: Settings, counts: dict[str, int]) -> str:
    wrong = {t: n for t, n in counts.items() if n != settings.partitions}
    existing = counts.get(settings.by_buyer_topic) or next(iter(wrong.values()))
    listed = "; ".join(f"topic {t} has {n} partitions" for t, n in wrong.items())
    return (
        f"{listed}, but COUPON_PARTITIONS is {settings.partitions}. Buyers are routed by "
        "crc32(buyer_id) % partitions, so a different count would route buyers away from "
        f"their state. Set COUPON_PARTITIONS={existing}, or start a new COUPON_APP_ID and "
        "replay the input."
    )


async def check_deployment(settings: Settings) -> None:
    """Refuse to start where the worker would misroute buyers or misread state.

    Raises DeploymentError when an existing by-buyer or changelog topic has a partition
    count other than COUPON_PARTITIONS, or when format-1 state exists (local RocksDB or a
    non-empty `buyers` changelog). Kafka errors propagate unchanged (an outage is not a
    deployment mistake).
    """
    local = legacy_state_dirs(settings.data_dir)
    if local:
        raise DeploymentError(_legacy_message([str(p) for p in local]))
    consumer = clients.consumer(settings)
    try:
        await consumer.start()
        legacy = settings.legacy_changelog_topic
        state = [settings.by_buyer_topic, *settings.changelog_topics.values()]
        found = await engine.topic_partitions(consumer, [*state, legacy])
        counts = {topic: len(found[topic]) for topic in state if found[topic]}
        if any(n != settings.partitions for n in counts.values()):
            raise DeploymentError(_partition_message(settings, counts))
        parts = found[legacy]
        if parts:
            ends = await consumer.end_offsets([TopicPartition(legacy, p) for p in parts])
            records = sum(ends.values())
            if records:
                raise DeploymentError(
                    _legacy_message([f"changelog topic {legacy} ({records} records written)"])
                )
    finally:
        await consumer.stop()
