"""The checkpoint's CPU per written key, without Kafka (or MySQL): what `make bench` cannot
separate from the rest of a worker.

A state stage on real RocksDB partitions (`bench.faust_store`, the worker's options)
applies a zipf-skewed dataset (`tools.dataset.generate`) in rounds, with the worker's
garbage collector settings; each round ends in one checkpoint whose steps are timed apart
on the main thread's CPU clock: derive (with the bytes to write), the changelog appends
(real aiokafka record batches, a producer that sends nothing), the local WriteBatches, and
the commit's bookkeeping. The sink is a stand-in that counts the rows,
or with --db the real `ResultSink` on a table of its own (its CPU is then the sink step;
the database's own work is not counted).

With --tiers, under a coupon policy (the grant events and the grants table's rows).

Usage: python -m bench.checkpoint_micro [--db URL] [--tiers TIERS] [ORDERS] [ROUNDS] [REPEATS]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from sqlalchemy.ext.asyncio import create_async_engine

from bench.faust_store import FaustStore
from coupon_stream.connectors.engine import RocksStore
from coupon_stream.connectors.kafka import ChangelogWriter, KafkaOut
from coupon_stream.connectors.mysql import ResultSink, RowKey, WriteResult
from coupon_stream.core.grants import Grant
from coupon_stream.core.records import BUYER, Row, Source, decode_rows, encode_rows, read_row
from coupon_stream.core.state import ResultRow
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.checkpoint import Checkpoint, Checkpointer
from coupon_stream.pipeline.fencing import Claims
from coupon_stream.pipeline.state_stage import StateStage, TableCache
from coupon_stream.tools.cli import _collect_garbage_less_often
from coupon_stream.tools.dataset import generate, jsonl

PARTITIONS = 4
ROWS_PER_MESSAGE = 20


class _Meta:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class _Producer:
    """aiokafka's record batches, built as the real producer builds them; none is sent."""

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, int], int] = defaultdict(int)

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(256 * 1024, 0, is_transactional=True)

    async def send_batch(self, batch: BatchBuilder, topic: str, partition: int) -> Any:
        n = batch.record_count()
        batch.close()
        batch._build()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(_Meta(self.offsets[(topic, partition)]))
        self.offsets[(topic, partition)] += n
        return done

    async def begin_transaction(self) -> None:
        pass

    async def commit_transaction(self) -> None:
        pass

    async def abort_transaction(self) -> None:
        pass


class _Changelogs(ChangelogWriter):
    async def claim(self, partition: int) -> None:
        self._producers[partition] = _Producer()


class _Sink(ResultSink):
    """Claims every partition at epoch 1; counts the rows it is handed."""

    def __init__(self) -> None:
        self.rows = 0

    async def claim(self, partition: int) -> int:
        return 1

    async def write(
        self,
        rows: Mapping[RowKey, ResultRow | None],
        still_wanted: Callable[[], bool] | None = None,
        epochs: Mapping[int, int] | None = None,
        grants: Mapping[RowKey, Grant] | None = None,
    ) -> WriteResult:
        self.rows += len(rows)
        return WriteResult(True)


class _Reader:
    """Nothing committed, empty changelogs."""

    async def committed(self, group: str, topic: str, partition: int) -> int | None:
        return 0

    async def end_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        return {p: 0 for p in partitions}

    async def records(
        self, topic: str, partition: int, start: int, end: int
    ) -> list[tuple[bytes | None, bytes | None]]:
        return []


async def _drop(sink: ResultSink, url: str) -> None:
    """The bench's own tables, gone."""
    await sink.stop()
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(sink.table.drop)
            await conn.run_sync(sink.fences.drop)
            if sink.grants is not None:
                await conn.run_sync(sink.grants.drop)
    finally:
        await engine.dispose()


def messages(orders: int, rounds: int) -> list[list[tuple[int, bytes]]]:
    """Per round, (partition, by-buyer message) in log order."""
    data = generate(orders, seed=11, buyers=orders // 4, skew="zipf")
    rows: list[Row] = [read_row(m, Source.ORDERS) for m in jsonl(data.orders)]
    rows += [read_row(m, Source.REFUNDS) for m in jsonl(data.refunds)]
    per_round = -(-len(rows) // rounds)
    out = []
    for start in range(0, len(rows), per_round):
        by_partition: dict[int, list[Row]] = defaultdict(list)
        for row in rows[start : start + per_round]:
            by_partition[row[BUYER] % PARTITIONS].append(row)
        out.append(
            [
                (p, encode_rows(part[i : i + ROWS_PER_MESSAGE]))
                for p, part in sorted(by_partition.items())
                for i in range(0, len(part), ROWS_PER_MESSAGE)
            ]
        )
    return out


def _timed(seconds: dict[str, float], step: str, fn: Callable[[], Any]) -> Any:
    start = time.thread_time()
    result = fn()
    seconds[step] += time.thread_time() - start
    return result


async def _timed_async(
    seconds: dict[str, float], step: str, fn: Callable[[], Awaitable[Any]]
) -> Any:
    start = time.thread_time()
    result = await fn()
    seconds[step] += time.thread_time() - start
    return result


async def run_once(
    rounds: Iterable[list[tuple[int, bytes]]], path: Path, db: str | None = None, tiers: str = ""
) -> dict[str, float]:
    """Apply each round, then checkpoint it; µs of CPU per written key, per step."""
    settings = Settings(
        app_id="bench",
        partitions=PARTITIONS,
        grant_tiers=tiers,
        grant_policy_version=int(bool(tiers)),
    )
    stores = {name: FaustStore(path / name, PARTITIONS) for name in ("entries", "days")}
    changelogs = _Changelogs(settings)
    sink: ResultSink = _Sink()
    if db is not None:
        table = f"ckpt_micro_{os.getpid()}_{time.time_ns()}"
        grants = f"{table}_grants" if tiers else None
        sink = ResultSink(db, table, app_id="ckpt-micro", grants=grants)
        await sink.start()
    entries = TableCache("entries", RocksStore(stores["entries"], "e"), "entries-changelog")
    days = TableCache("days", RocksStore(stores["days"], "d"), "days-changelog")

    async def confirm(partition: int, offset: int) -> bool:
        return True

    stage = StateStage(
        settings,
        entries,
        days,
        _Reader(),  # type: ignore[arg-type]
        Claims(changelogs, sink),
        confirm=confirm,
    )

    async def commit(offsets: Mapping[int, int]) -> bool:
        return True

    async def acknowledge(tokens: list[Any], committed: bool) -> None:
        pass

    owner = Checkpointer(settings, stage, KafkaOut(settings), changelogs, sink, commit, acknowledge)
    seconds: dict[str, float] = defaultdict(float)
    keys = records = 0
    offsets: dict[int, int] = defaultdict(int)
    gc.collect()
    for i, batch in enumerate(rounds):
        for partition, raw in batch:
            offset = offsets[partition]
            offsets[partition] += 1
            await stage.add(raw, partition, offset, offset, 0)
        c = Checkpoint(owner)
        await c.take_snapshot()
        timing = i > 0  # the first round fills the stores
        t = seconds if timing else defaultdict(float)
        _timed(t, "derive", c.derive)
        await _timed_async(t, "changelog", c.changelog)
        _timed(t, "store", c.store)
        await _timed_async(t, "sink", c.write)
        await _timed_async(t, "commit", c.commit_offsets)
        if timing:
            keys += sum(len(v) for per in c.writes.values() for v in per.values())
            records += sum(len(decode_rows(raw)) for _, raw in batch)
    for store in stores.values():
        store.close()
    if db is not None:
        await _drop(sink, db)
    per_key = {step: s * 1e6 / keys for step, s in seconds.items()}
    per_key["total"] = sum(per_key.values())
    per_key["keys"] = keys
    per_key["per record"] = sum(seconds.values()) * 1e6 / records
    return per_key


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--db", help="a database URL: time the real sink (a table of its own)")
    args.add_argument("--tiers", default="", help='coupon tiers, e.g. "200:20,500:60"')
    args.add_argument("orders", type=int, nargs="?", default=40_000)
    args.add_argument("rounds", type=int, nargs="?", default=4)
    args.add_argument("repeats", type=int, nargs="?", default=3)
    a = args.parse_args()
    data = messages(a.orders, a.rounds)
    _collect_garbage_less_often()  # the worker's collector settings
    results = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="ckpt-micro-") as tmp:
            results.append(asyncio.run(run_once(data, Path(tmp), a.db, a.tiers)))
    steps = ["derive", "changelog", "store", "sink", "commit", "total"]
    repeats = a.repeats
    keys = int(results[0]["keys"])
    medians = {s: statistics.median(r[s] for r in results) for s in steps}
    per_record = statistics.median(r["per record"] for r in results)
    print(
        f"checkpoint CPU, µs per written key (median of {repeats}, {keys} keys): "
        + " ".join(f"{s}={medians[s]:.2f}" for s in steps)
        + f"; µs per input record: {per_record:.2f}"
    )


if __name__ == "__main__":
    main()
