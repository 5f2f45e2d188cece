"""CPU of the state stage's `apply` per record, alone: no Kafka, no MySQL, no event loop work.

A skewed dataset (`tools.dataset.generate(..., skew="zipf")`) goes through intake's own
`read_row`, `route` and `split_rows` into by-buyer messages (~500 rows per partition and
intake batch), which one `StateStage` applies to its caches over RocksDB partitions opened
with the worker's options (`--memory`: dict partitions instead). Every `--checkpoint`
messages the caches' changed keys are written to the stores as a checkpoint writes them
(untimed), so later records read real stored values, and the keys of the checkpoint
still being written from its layer. The cycle collector runs as in a worker (`cli`).
Prints µs per record for each run and their median, and a digest of the final state and
outcomes: two versions of the code must print the same digest.

Usage: python -m bench.apply_micro [--orders N] [--runs R] [--memory]
(to compare two trees, run this file with PYTHONPATH set to each in turn).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import pickle
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from bench.faust_store import FaustStore
from coupon_stream.connectors.clients import TopicPartition
from coupon_stream.connectors.engine import RocksStore
from coupon_stream.connectors.sources import Fetched
from coupon_stream.connectors.store import MemoryStore, PartitionStore
from coupon_stream.core.records import Source
from coupon_stream.core.stored import encode_value, read_value
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.intake import route, split_rows
from coupon_stream.pipeline.state_stage import SAVED, VALUE, Session, StateStage, TableCache
from coupon_stream.tools.cli import _collect_garbage_less_often as collect_garbage_like_a_worker
from coupon_stream.tools.dataset import generate, jsonl

PARTITIONS = 8
INTAKE_BATCH = 4000  # source messages per intake batch: ~500 rows per partition
SID = 12345


def by_buyer_messages(orders: int, seed: int) -> list[tuple[int, bytes]]:
    """(partition, by-buyer message) in the order intake would send them."""
    data = generate(orders, seed=seed, buyers=max(1, orders // 4), skew="zipf")
    tagged = [(i / len(data.orders), "orders", v) for i, v in enumerate(jsonl(data.orders))]
    tagged += [(i / len(data.refunds), "refunds", v) for i, v in enumerate(jsonl(data.refunds))]
    tagged.sort(key=lambda t: t[0])  # both topics consumed side by side
    sources = {"orders": Source.ORDERS, "refunds": Source.REFUNDS}
    out: list[tuple[int, bytes]] = []
    for start in range(0, len(tagged), INTAKE_BATCH):
        chunk = tagged[start : start + INTAKE_BATCH]
        runs: list[Fetched] = []  # a run per stretch of one topic, in arrival order
        for _, t, v in chunk:  # every message valid: their origins are never asked for
            if not runs or runs[-1].tp.topic != t:
                runs.append(Fetched(TopicPartition(t, 0), [], [], 0))
            runs[-1].values.append(v)
        routed = route(runs, sources, PARTITIONS)
        for partition, rows in sorted(routed.by_partition.items()):
            out.extend((partition, raw) for raw in split_rows(rows))
    return out


def cached_messages(orders: int, seed: int) -> list[tuple[int, bytes]]:
    """`by_buyer_messages`, kept in the temp dir: both trees then apply the same bytes."""
    path = Path(tempfile.gettempdir()) / f"apply_micro-{orders}-{seed}.pickle"
    if path.exists():
        messages: list[tuple[int, bytes]] = pickle.loads(path.read_bytes())
        return messages
    messages = by_buyer_messages(orders, seed)
    path.write_bytes(pickle.dumps(messages))
    return messages


def checkpoint(stage: StateStage, offset: int, writing: list[Any]) -> list[Any]:
    """Write every changed key as the checkpoint does; return the layers it wrote.

    A real checkpoint runs while the next records apply, which read the keys it is writing
    from its layer until it is over: so each one is released only at the next one.
    """
    for cache, layer in zip(stage.caches, writing, strict=True):
        cache.release(layer)
    layers = []
    for cache in stage.caches:
        layer = cache.snapshot()
        for partition, slots in layer.items():
            values: dict[bytes, bytes | None] = {}
            for key, slot in slots.items():
                if slot[VALUE] != slot[SAVED] or len(slot) > 2:
                    current = slot[VALUE]
                    values[key] = (
                        None if current is None else encode_value(SID, offset, current, slot[SAVED])
                    )
            cache.store.write(partition, values)
        layers.append(layer)
    return layers


def outcome_counts() -> dict[str, float]:
    return {
        m.labels["outcome"]: m.value
        for family in metrics.RECORDS.collect()
        for m in family.samples
        if m.name.endswith("_total")
    }


async def one_run(
    messages: list[tuple[int, bytes]], memory: bool, every: int, root: Path
) -> tuple[float, int, str]:
    """CPU seconds of this thread in `apply` (other load on the machine and RocksDB's own
    threads left out), rows applied, and the digest of what they left."""
    settings = Settings(app_id="apply-micro", data_dir=root, partitions=PARTITIONS)
    faust_stores = [FaustStore(root / name, PARTITIONS) for name in ("entries", "days")]
    stores: list[PartitionStore] = (
        [MemoryStore(), MemoryStore()] if memory else [RocksStore(s, "x") for s in faust_stores]
    )
    entries = TableCache("entries", stores[0], "entries-changelog")
    days = TableCache("days", stores[1], "days-changelog")

    async def confirm(partition: int, offset: int) -> bool:
        return True

    stage = StateStage(settings, entries, days, None, None, confirm)  # type: ignore[arg-type]
    for partition in range(PARTITIONS):
        stage.sessions[partition] = Session(SID, 0)
    before = outcome_counts()
    offsets: dict[int, int] = defaultdict(int)
    rows = 0
    spent = 0.0
    stale: set[tuple[int, bytes]] = set()
    touched: set[tuple[int, int, int]] = set()
    dead: list[tuple[int, bytes | None]] = []
    writing: list[Any] = [{}, {}]
    for n, (partition, raw) in enumerate(messages, 1):
        offset = offsets[partition]
        offsets[partition] += 1
        rows += len(orjson.loads(raw))  # untimed
        t0 = time.thread_time()
        await stage.apply(raw, partition, offset, None)
        spent += time.thread_time() - t0
        if n % every == 0 or n == len(messages):
            pending = stage.pending
            stale.update((p, k) for p, keys in pending.stale.items() for k in keys)
            touched.update((p, b, d) for p, t in pending.touched.items() for b, d in t)
            dead.extend((d.offset, d.value) for d in pending.dead_letters)
            stage.pending = type(pending)()
            writing = checkpoint(stage, n, writing)
    state = [
        sorted((k, orjson.dumps(read_value(v, n))) for k, v in s.items(p))
        for s in stores
        for p in range(PARTITIONS)
    ]
    after = outcome_counts()
    outcomes = {k: after[k] - before.get(k, 0) for k in sorted(after)}
    digest = hashlib.sha256(
        pickle.dumps((state, sorted(stale), sorted(touched), dead, outcomes))
    ).hexdigest()[:16]
    for store in faust_stores:
        store.close()
    return spent, rows, f"{digest} {outcomes}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=int, default=40, help="messages per checkpoint")
    parser.add_argument("--memory", action="store_true", help="dict partitions, not RocksDB")
    args = parser.parse_args(argv)
    messages = cached_messages(args.orders, args.seed)
    collect_garbage_like_a_worker()
    per_record = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="apply-micro-") as tmp:
            spent, rows, digest = asyncio.run(
                one_run(messages, args.memory, args.checkpoint, Path(tmp))
            )
        per_record.append(spent / rows * 1e6)
        print(f"run {run}: {rows} rows, {per_record[-1]:.3f} us/record, state {digest}")
    print(f"median {statistics.median(per_record):.3f} us/record", file=sys.stdout)


if __name__ == "__main__":
    main()
