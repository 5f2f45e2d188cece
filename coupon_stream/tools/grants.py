"""`coupon-stream grants`: a buyer's totals, tiers and grant history; the reconcile after a
policy change (README, "Coupon grants")."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import orjson

from coupon_stream.connectors.kafka import KafkaOut, PartitionReader
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.core.grants import Grant, Policy, reconcile
from coupon_stream.core.records import partition_for_buyer
from coupon_stream.foundation.settings import Settings


class NoPolicy(RuntimeError):
    """The command needs COUPON_GRANT_TIERS and COUPON_GRANT_POLICY_VERSION."""


def policy_of(settings: Settings) -> Policy:
    policy = settings.policy
    if policy is None:
        raise NoPolicy("no coupon policy: set COUPON_GRANT_TIERS and COUPON_GRANT_POLICY_VERSION")
    return policy


async def history(settings: Settings, buyer: int, day: int | None = None) -> list[str]:
    """A buyer's day totals, the tier each reaches, its grant, and its events."""
    policy = policy_of(settings)
    sink = ResultSink.of(settings)
    await sink.start()
    try:
        totals, granted = await sink.totals_and_grants(buyer, day)
    finally:
        await sink.stop()
    lines = [f"buyer {buyer}; policy {policy.describe()}"]
    lines.append("day       total  tier  coupon  grants table (tier, coupon, policy)")
    for key in sorted(totals.keys() | granted.keys()):
        total = totals.get(key)
        tier = policy.tier(total)
        row = granted.get(key)
        held = "none" if row is None else f"{row[0]}, {row[1]}, v{row[2]}"
        shown = "-" if total is None else str(total)
        lines.append(f"{key[1]}  {shown:>5}  {tier:>4}  {policy.amount(tier):>6}  {held}")
    partition = partition_for_buyer(buyer, settings.partitions)
    events = await _events(settings, partition, buyer, day)
    lines.append(f"events ({settings.grants_topic}, partition {partition}): {len(events)}")
    for e in events:
        lines.append(
            f"  {e['effect_time']}  {e['kind']:<6}  tier {e['tier_before']} -> {e['tier']}  "
            f"coupon {e['coupon_amount']}  policy {e['policy_version']}  version {e['version']}"
        )
    return lines


async def _events(
    settings: Settings, partition: int, buyer: int, day: int | None
) -> list[dict[str, Any]]:
    """The buyer's committed events, in log order (the whole partition is read)."""
    reader = PartitionReader(settings)
    try:
        topic = settings.grants_topic
        end = (await reader.end_offsets(topic, [partition])).get(partition, 0)
        found = []
        for _, value, _ in await reader.read(topic, partition, 0, end):
            event = orjson.loads(value)
            if event["buyer_id"] == buyer and day in (None, event["effect_time"]):
                found.append(event)
        return found
    finally:
        await reader.stop()


async def reconcile_all(settings: Settings, dry_run: bool = False) -> list[str]:
    """Re-judge every day under the current policy; send and write only the differences.

    Idempotent: run again, it finds nothing to do. Events go out first, then the table: a
    run cut short in between is finished by the next one, with the same events.
    """
    policy = policy_of(settings)
    sink = ResultSink.of(settings)
    await sink.start()
    try:
        totals, granted = await sink.totals_and_grants()
        newer = sorted({v for _, _, v in granted.values() if v > policy.version})
        if newer:
            raise NoPolicy(
                f"the grants table holds policy version {newer[-1]}, newer than "
                f"COUPON_GRANT_POLICY_VERSION={policy.version}: run with the workers' policy"
            )
        grants = reconcile(policy, totals, granted)
        kinds: dict[str, int] = defaultdict(int)
        for grant in grants:
            kinds[grant.kind] += 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
        lines = [
            f"policy {policy.describe()}: {len(totals)} days, {len(granted)} grants; "
            f"{len(grants)} to change ({summary})"
        ]
        if dry_run or not grants:
            lines += [_line(g) for g in grants[:50]]
            return lines
        await _send(settings, grants)
        changed = await sink.write_reconciled(grants)
        lines.append(
            f"sent {len(grants)} events to {settings.grants_topic}; {changed} rows of "
            f"{settings.grants_table} changed"
        )
        return lines
    finally:
        await sink.stop()


def _line(grant: Grant) -> str:
    return (
        f"  buyer {grant.buyer_id} day {grant.effect_time}: {grant.kind} tier "
        f"{grant.tier_before} -> {grant.tier}, coupon {grant.coupon_amount}"
    )


async def _send(settings: Settings, grants: list[Grant]) -> None:
    """Each event in its buyer's partition, as a worker sends it; waits for Kafka."""
    by_partition: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for grant in grants:
        by_partition[partition_for_buyer(grant.buyer_id, settings.partitions)].append(
            (grant.key(), grant.value())
        )
    out = KafkaOut(settings)
    try:
        sent = []
        for partition, records in by_partition.items():
            sent += await out.send_records(settings.grants_topic, partition, records)
        await asyncio.gather(*(f for f, _ in sent))
    finally:
        await out.stop()
