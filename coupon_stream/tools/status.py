"""Operator views from outside the worker: consumer lag, dead letters, table size, topics."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass
from functools import partial

from coupon_stream.connectors import clients, engine
from coupon_stream.connectors.clients import AIOKafkaConsumer, TopicPartition
from coupon_stream.connectors.deployment import operator_call
from coupon_stream.connectors.kafka import behind
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.foundation.settings import Settings


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
            committed = await operator_call(partial(admin.list_consumer_group_offsets, group))
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
