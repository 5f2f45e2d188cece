"""How long partitions stay unprocessed when a worker dies, with and without standbys.

`python -m bench.takeover [--entries 1000000]`: writes a state of N dedup entries straight
into the state tables' changelogs (format 2: entries and days), starts two workers
(COUPON_STANDBY_REPLICAS 0 or 1), waits until they have restored it (and, with standbys,
mirrored it), kills one with SIGKILL, and measures the time from the kill until a probe
record for every partition is visible in MySQL again. Results go to
bench/results/takeover-<ts>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.run import DB_URL, ROOT, Proc, machine, save_results, settings_for
from coupon_stream.connectors import clients, deployment
from coupon_stream.connectors.kafka import KafkaOut
from coupon_stream.core.records import partition_for_buyer
from coupon_stream.core.stored import (
    at_start,
    day_key,
    entry_key,
    marks,
)
from coupon_stream.foundation.settings import Settings

ENTRIES_PER_BUYER = 4
CHUNK_BUYERS = 50_000
DAY = 20261111
CREATED = "2026-11-11 00:00:00"
PROBE_BASE = 7_000_000_000


async def synthesize_state(
    settings: Settings, entries: int, *, first_buyer: int = 1, meta: bool = True
) -> int:
    """Write a format-2 state of `entries` kept entries straight into both changelogs.

    What a checkpoint would have written (docs/design.md, "State"): per buyer, its entries
    and its one day, each a `Versioned` value at by-buyer offset 0, plus each partition's
    meta (unless `meta` is false: state added next to a real one, whose meta must stand);
    a worker restores it as if the input had been processed. Returns the records written.
    """
    await deployment.create_internal_topics(settings)
    topics = settings.changelog_topics
    partitions = settings.partitions
    out = KafkaOut(settings)
    written = 0
    try:
        buyers = range(first_buyer, first_buyer + entries // ENTRIES_PER_BUYER)
        for first in range(0, len(buyers), CHUNK_BUYERS):
            tables: dict[str, dict[int, list[tuple[bytes, bytes]]]] = {"entries": {}, "days": {}}
            for b in buyers[first : first + CHUNK_BUYERS]:
                q = partition_for_buyer(b, partitions)
                tables["entries"].setdefault(q, []).extend(
                    (
                        entry_key(b, f"s{b}-{k}", "2"),
                        at_start([DAY, 1, CREATED, None]),
                    )
                    for k in range(ENTRIES_PER_BUYER)
                )
                day = [ENTRIES_PER_BUYER, ENTRIES_PER_BUYER, CREATED, None]
                tables["days"].setdefault(q, []).append((day_key(b, DAY), at_start(day)))
            if first == 0 and meta:
                for q in range(partitions):
                    tables["days"].setdefault(q, []).extend(marks(0, 0).items())
            for name, per_partition in tables.items():
                for q, records in per_partition.items():
                    sent = await out.send_records(topics[name], q, records)
                    await asyncio.gather(*(f for f, _ in sent))
                    written += len(records)
    finally:
        await out.stop()
    return written


def probe_buyers(partitions: int, round_: int) -> dict[int, int]:
    """One new buyer id per partition for this probe round."""
    found: dict[int, int] = {}
    b = PROBE_BASE + round_ * 10_000
    while len(found) < partitions:
        found.setdefault(partition_for_buyer(b, partitions), b)
        b += 1
    return found


async def scenario(standbys: int, entries: int, partitions: int, stamp: str) -> dict[str, Any]:
    run = f"takeover-{stamp}-s{standbys}"
    tmp = ROOT / ".local" / "bench" / run
    tmp.mkdir(parents=True, exist_ok=True)
    base = settings_for(run, run, partitions, tmp, 0)
    await deployment.create_input_topics(base, partitions)
    changelog_records = await synthesize_state(base, entries)
    procs = []
    for i in range(2):
        s = settings_for(run, run, partitions, tmp / f"w{i}", 6170 + i + 2 * standbys)
        s.standby_replicas = standbys
        procs.append(Proc(s, tmp / f"w{i}.log"))
    engine = create_async_engine(DB_URL)
    producer = clients.producer(base, linger_ms=1)
    await producer.start()
    try:
        started = time.perf_counter()
        for p in procs:
            while not p.ready():
                await asyncio.sleep(0.2)
        ready_s = time.perf_counter() - started
        wanted = changelog_records * (1 + standbys)
        while sum(p.metric("coupon_state_restored_records_total") for p in procs) < wanted:
            if time.perf_counter() - started > 900:
                raise RuntimeError("state never fully restored")
            await asyncio.sleep(0.5)
        restored_s = time.perf_counter() - started
        await asyncio.sleep(3)
        victim = procs[0]
        victim.proc.kill()
        killed = time.perf_counter()
        seen: dict[int, float] = {}
        round_ = 0
        while len(seen) < partitions and time.perf_counter() - killed < 600:
            probes = probe_buyers(partitions, round_)
            for q, b in probes.items():
                if q in seen:
                    continue
                value = json.dumps(
                    {
                        "biz_order_id": f"probe-{round_}-{q}",
                        "pay_status": "2",
                        "buyer_id": str(b),
                        "pay_time": "2026-11-11 12:00:00",
                        "div_idx_actual_total_fee": 10_000,
                    }
                ).encode()
                await producer.send(base.orders_topic, value=value)
            await producer.flush()
            await asyncio.sleep(0.5)
            async with engine.connect() as conn:
                try:
                    rows = await conn.execute(
                        text(
                            f"SELECT buyer_id FROM `{base.result_table}` "
                            f"WHERE buyer_id >= {PROBE_BASE}"
                        )
                    )
                except Exception:  # noqa: BLE001 - table not created yet
                    rows = None
                now = time.perf_counter()
                for (b,) in rows or ():
                    q = partition_for_buyer(b, partitions)
                    seen.setdefault(q, now - killed)
            round_ += 1
        return {
            "standby_replicas": standbys,
            "dedup_entries": entries // ENTRIES_PER_BUYER * ENTRIES_PER_BUYER,
            "changelog_records": changelog_records,
            "both_workers_ready_s": round(ready_s, 1),
            "state_and_standbys_restored_s": round(restored_s, 1),
            "all_partitions_processing_again_after_kill_s": round(max(seen.values()), 1)
            if len(seen) == partitions
            else None,
            "per_partition_s": {q: round(t, 1) for q, t in sorted(seen.items())},
        }
    finally:
        await producer.stop()
        await engine.dispose()
        for p in procs:
            p.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [await scenario(s, args.entries, args.partitions, stamp) for s in (0, 1)]
    out = {
        "machine": machine(),
        "command": f"python -m bench.takeover --entries "
        f"{args.entries} --partitions {args.partitions}",
        "scenarios": results,
    }
    lines = [
        f"Command: `{out['command']}` (2 workers, session timeout 10 s)",
        "",
        "| standby replicas | dedup entries | both workers ready s | state (+standbys) restored s "
        "| all partitions processing again after kill -9 s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['standby_replicas']} | {r['dedup_entries']} | {r['both_workers_ready_s']} "
            f"| {r['state_and_standbys_restored_s']} "
            f"| {r['all_partitions_processing_again_after_kill_s']} |"
        )
    save_results(f"takeover-{stamp}", out, "\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
