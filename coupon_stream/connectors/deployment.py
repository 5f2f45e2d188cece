"""What a deployment must hold before a worker starts, checked and created at start.

The start-up checks (`check_deployment`) refuse a deployment the worker would silently get
wrong: topics whose partition counts would route buyers away from their state, state of a
format it cannot read. Then the topics it needs are created (`create_internal_topics`), as
`coupon-stream topics` creates the input ones (`create_input_topics`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from coupon_stream.connectors import clients, engine
from coupon_stream.connectors.faults import Backoff, retry
from coupon_stream.connectors.kafka import create_topics
from coupon_stream.core.state import STATE_TABLES
from coupon_stream.core.stored import STATE_FORMAT
from coupon_stream.foundation.settings import Settings

T = TypeVar("T")


async def operator_call(call: Callable[[], Awaitable[T]]) -> T:
    """An operator's one-shot call: retries a fresh cluster's missing group coordinator for
    a minute, not an outage for ever."""
    return await retry(call, timeout=60.0, backoff=Backoff(0.2, 1.0))


async def create_input_topics(settings: Settings, partitions: int) -> list[str]:
    topics = (settings.orders_topic, settings.refunds_topic)
    return await create_topics(
        settings, [NewTopic(t, partitions, settings.replication_factor) for t in topics]
    )


async def create_internal_topics(settings: Settings) -> list[str]:
    """The by-buyer topic, the tables' changelogs, the dead-letter topic and, with a coupon
    policy, the grants topic.

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
            # Partitioned as the by-buyer topic: each event in its buyer's partition, in the
            # same transaction as that partition's changelog records.
            *([NewTopic(settings.grants_topic, p, rf)] if settings.policy is not None else []),
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
