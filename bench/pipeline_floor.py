"""The service's Kafka data flow with no state: what this stack costs before any logic.

One process does what a worker must do with every event whatever its logic
(docs/design.md, "Data flow": a buyer's records go to the worker owning the buyer,
whatever key the producer used):

    source topics -> read_row -> route by buyer -> by-buyer topic -> read back
        -> one changelog record per row

with the service's own parts (`SourceConsumer`, `read_row`, `route`, `split_rows`,
`KafkaOut`), and neither RocksDB, nor dedup, nor MySQL. Its CPU per event bounds from below
what any worker of this design can spend; `make bench` reports it next to the raw
floor. Usage: python -m bench.pipeline_floor TOPICS_PREFIX MESSAGES
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from coupon_stream.connectors.kafka import KafkaOut, create_topics
from coupon_stream.connectors.sources import SourceConsumer
from coupon_stream.core.records import Source
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.intake import route, split_rows

# The service's mean changelog value (a buyer's kept records) on the bench dataset, bytes.
CHANGELOG_VALUE = b"x" * 360
FETCH = {"max_partition_fetch_bytes": 4 * 1024 * 1024, "fetch_max_bytes": 16 * 1024 * 1024}


async def pipeline_floor(
    bootstrap: str, topics: str, total: int, partitions: int
) -> dict[str, Any]:
    """Run the pass-through until every valid row is back; CPU seconds and wall time."""
    run = f"{topics}-floor{time.time_ns()}"
    s = Settings(
        broker=f"kafka://{bootstrap}",
        app_id=run,
        orders_topic=f"{topics}-orders",
        refunds_topic=f"{topics}-refunds",
        dlq_topic=f"{run}-dlq",
        partitions=partitions,
    )
    # Not compacted: the broker's cleaner would still be at it during the next timed run.
    changelog = f"{run}-changelog"
    await create_topics(s, [NewTopic(t, partitions, 1) for t in (s.by_buyer_topic, changelog)])
    sources = {s.orders_topic: Source.ORDERS, s.refunds_topic: Source.REFUNDS}
    out = KafkaOut(s)
    source = SourceConsumer(
        s, sources, group_id=run, session_timeout_ms=10_000, heartbeat_interval_ms=1_000
    )
    by_buyer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", **FETCH
    )
    await source.start()
    await by_buyer.start()
    by_buyer.assign([TopicPartition(s.by_buyer_topic, p) for p in range(partitions)])
    forwarded = asyncio.Event()
    sent_rows = 0
    back_rows = 0

    async def intake() -> None:
        nonlocal sent_rows
        seen = 0
        while seen < total:
            fetched = await source.fetch(s.intake_batch, 0.5)
            seen += sum(len(run.values) for run in fetched)
            routed = route(fetched, sources, partitions)
            sends = [
                await out.send(s.by_buyer_topic, value, partition=p)
                for p, rows in routed.by_partition.items()
                for value in split_rows(rows)
            ]
            await asyncio.gather(*sends)
            sent_rows += sum(len(rows) for rows in routed.by_partition.values())
            await source.commit({run.tp: run.next_offset for run in fetched})
        forwarded.set()

    async def state() -> None:
        nonlocal back_rows
        while not forwarded.is_set() or back_rows < sent_rows:
            batches = await by_buyer.getmany(timeout_ms=200)
            for tp, messages in batches.items():
                for message in messages:
                    rows = orjson.loads(message.value)
                    back_rows += len(rows)
                    records = [(str(row[0]).encode(), CHANGELOG_VALUE) for row in rows]
                    for future, _ in await out.send_records(changelog, tp.partition, records):
                        await future

    cpu, start = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(intake(), state())
    finally:
        await source.stop()
        await by_buyer.stop()
        await out.stop()
    elapsed = time.perf_counter() - start
    return {
        "events_per_s": round(total / elapsed),
        "cpu_s_per_million": round((time.process_time() - cpu) / total * 1e6, 1),
    }


if __name__ == "__main__":
    print(asyncio.run(pipeline_floor("127.0.0.1:9092", sys.argv[1], int(sys.argv[2]), 8)))
