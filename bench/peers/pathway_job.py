"""The seed job in Pathway 0.33, written the way Pathway's own examples write such a job.

Kafka in (`pw.io.kafka.read`, JSON, one connector per topic), then every step in
Pathway's engine as table operations and column expressions, no Python function per
record:

1. merge: both topics' rows in one table (`concat_reindex`), a refund's `refund_fee` as
   the amount (the seed's UNION ALL);
2. dedup per `(biz_order_id, pay_status)`, keeping the first-generated copy: the row
   with the smallest `gmt_modified`, a null one last (`groupby` + `reducers.argmin` and
   `ix` to fetch that row); its contribution follows when an earlier copy arrives later;
3. per buyer and day: `sum` of each kept record's `trunc(amount / 100)` (`pw.cast(int,
   ...)` truncates toward zero, as Java's DOUBLE to BIGINT cast), `min(gmt_create)`
   (nulls skipped, as SQL's MIN: Pathway's `min` orders a None first, so a sentinel
   stands for it) and `max(gmt_modified)`;
4. the rows with `cumulate_amount > 0`.

`tddl_output(orders, refunds)` is the computation, whatever the tables come from (the
test feeds it from JSON-lines files). `main` is the bench's job: it reads the topics from
the beginning in streaming mode and keeps the result in memory (`pw.io.subscribe`: a dict
by (buyer_id, effect_time)), with no persistence, so no durability. It also counts the
input rows in the engine: once the count reaches `--total` and the result has been closed
for a time at or after the one that brought the count there, every input row has gone
through every step, and the job prints a `done` line (see `bench/peers/run.py`).

Run alone: python -m bench.peers.pathway_job --bootstrap 127.0.0.1:9092 \
    --orders-topic T-orders --refunds-topic T-refunds --total N [--dump result.json]
Threads: PATHWAY_THREADS (default 1), as `pathway spawn --threads` sets it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from functools import cache
from typing import Any

try:
    import pathway as pw
except ModuleNotFoundError:  # importable without it; building or running the job needs it
    pw = None

# Greater than any timestamp text: a null sorts last in MIN and ARGMIN through it.
NULL_LAST = "\uffff"


@cache
def schemas() -> tuple[Any, Any]:
    """The orders' and the refunds' input schemas (built on first use: they need pathway,
    which only `make bench-peers` installs)."""
    if pw is None:
        raise ModuleNotFoundError("pathway is not installed: `make bench-peers` installs it")

    class _Payment(pw.Schema):
        biz_order_id: str
        auction_id: str | None = pw.column_definition(default_value=None)
        auction_title: str | None = pw.column_definition(default_value=None)
        buyer_id: str
        buyer_nick: str | None = pw.column_definition(default_value=None)
        pay_time: str
        gmt_create: str | None = pw.column_definition(default_value=None)
        gmt_modified: str | None = pw.column_definition(default_value=None)
        biz_type: str | None = pw.column_definition(default_value=None)
        pay_status: str
        attributes: str | None = pw.column_definition(default_value=None)
        from_group: str | None = pw.column_definition(default_value=None)

    class OrderSchema(_Payment):
        div_idx_actual_total_fee: float

    class RefundSchema(_Payment):
        refund_fee: float

    return OrderSchema, RefundSchema


def payments(orders: pw.Table, refunds: pw.Table) -> pw.Table:
    """The seed's UNION ALL: one table of payment records, the amount in `amount`."""
    columns = ("biz_order_id", "pay_status", "buyer_id", "pay_time", "gmt_create", "gmt_modified")
    return pw.Table.concat_reindex(
        orders.select(*(orders[c] for c in columns), amount=orders.div_idx_actual_total_fee),
        refunds.select(*(refunds[c] for c in columns), amount=refunds.refund_fee),
    )


def first_generated(merged: pw.Table) -> pw.Table:
    """One row per (biz_order_id, pay_status): the one with the smallest gmt_modified."""
    keyed = merged.with_columns(generated=pw.coalesce(pw.this.gmt_modified, NULL_LAST))
    firsts = keyed.groupby(pw.this.biz_order_id, pw.this.pay_status).reduce(
        first=pw.reducers.argmin(pw.this.generated)
    )
    return keyed.ix(firsts.first).select(
        pw.this.buyer_id, pw.this.pay_time, pw.this.gmt_create, pw.this.gmt_modified,
        pw.this.amount,
    )  # fmt: skip


def per_buyer_day(kept: pw.Table) -> pw.Table:
    """The seed's GROUP BY buyer_id, date_format(pay_time, ..., 'yyyyMMdd'), all sums."""
    day = pw.this.pay_time.dt.strptime("%Y-%m-%d %H:%M:%S")
    rows = kept.select(
        buyer_id=pw.this.buyer_id.str.parse_int(),
        effect_time=day.dt.year() * 10_000 + day.dt.month() * 100 + day.dt.day(),
        yuan=pw.cast(int, pw.this.amount / 100),  # truncated toward zero, per record
        gmt_create=pw.coalesce(pw.this.gmt_create, NULL_LAST),
        gmt_modified=pw.this.gmt_modified,
    )
    sums = rows.groupby(pw.this.buyer_id, pw.this.effect_time).reduce(
        pw.this.buyer_id,
        pw.this.effect_time,
        cumulate_amount=pw.reducers.sum(pw.this.yuan),
        first_created=pw.reducers.min(pw.this.gmt_create),
        gmt_modified=pw.reducers.max(pw.this.gmt_modified),  # a None is the smallest
    )
    return sums.select(
        gmt_create=pw.if_else(pw.this.first_created == NULL_LAST, None, pw.this.first_created),
        gmt_modified=pw.this.gmt_modified,
        buyer_id=pw.this.buyer_id,
        cumulate_amount=pw.this.cumulate_amount,
        effect_time=pw.this.effect_time,
    )


def positive(sums: pw.Table) -> pw.Table:
    """The seed's INSERT INTO tddl_output ... WHERE cumulate_amount > 0."""
    return sums.filter(pw.this.cumulate_amount > 0)


def tddl_output(orders: pw.Table, refunds: pw.Table) -> pw.Table:
    """The rows of the seed's `tddl_output` after this input."""
    return positive(per_buyer_day(first_generated(payments(orders, refunds))))


Row = tuple[str | None, str | None, int, int, int]


def from_files(orders_path: str, refunds_path: str) -> list[Row]:
    """`tddl_output` over two JSON-lines files read whole (the test's way in, no Kafka)."""
    order_schema, refund_schema = schemas()
    orders = pw.io.jsonlines.read(orders_path, schema=order_schema, mode="static")
    refunds = pw.io.jsonlines.read(refunds_path, schema=refund_schema, mode="static")
    columns = pw.debug.table_to_dicts(tddl_output(orders, refunds))[1]
    names = ("gmt_create", "gmt_modified", "buyer_id", "cumulate_amount", "effect_time")
    return [tuple(columns[n][key] for n in names) for key in columns["buyer_id"]]


class InMemorySink:
    """The result kept in a dict by key, as an upsert sink would keep it; no durability."""

    def __init__(self) -> None:
        self.rows: dict[Any, Row] = {}

    def on_change(self, key: Any, row: dict[str, Any], time: int, is_addition: bool) -> None:
        value = (
            row["gmt_create"],
            row["gmt_modified"],
            row["buyer_id"],
            row["cumulate_amount"],
            row["effect_time"],
        )
        if is_addition:
            self.rows[key] = value
        elif self.rows.get(key) == value:
            # The row held is retracted. An update retracts the old row and adds the new one
            # at the same time, in either order: a retraction of another row is the old one.
            del self.rows[key]


class Done:
    """When every input row has been counted and the result closed at or after that time."""

    def __init__(self, total: int, on_done: Any) -> None:
        self.total = total
        self.on_done = on_done
        self.lock = threading.Lock()
        self.count = 0
        self.count_time: int | None = None  # the engine time at which the count reached total
        self.closed: int = -1  # the latest time the result table was closed for
        self.first_seen: float | None = None
        self.fired = False

    def on_count(self, key: Any, row: dict[str, Any], time: int, is_addition: bool) -> None:
        with self.lock:
            if self.first_seen is None:
                self.first_seen = time_now()
            if is_addition:
                self.count = row["n"]
                if self.count >= self.total and self.count_time is None:
                    self.count_time = time
            self._check()

    def on_result_time_end(self, time: int) -> None:
        with self.lock:
            self.closed = max(self.closed, time)
            self._check()

    def _check(self) -> None:
        if self.fired or self.count_time is None or self.closed < self.count_time:
            return
        self.fired = True
        self.on_done(self)


def time_now() -> float:
    return time.monotonic()  # CLOCK_MONOTONIC: system-wide, comparable with the runner's


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--orders-topic", required=True)
    parser.add_argument("--refunds-topic", required=True)
    parser.add_argument("--group", default=f"pathway-peer-{time.time_ns()}")
    parser.add_argument("--total", type=int, required=True, help="input messages to wait for")
    parser.add_argument(
        "--autocommit-ms", type=int, default=1500, help="the connector's (Pathway's default)"
    )
    parser.add_argument("--dump", help="write the final table here as JSON, after `done`")
    args = parser.parse_args()
    started = time_now()

    settings = {
        "bootstrap.servers": args.bootstrap,
        "auto.offset.reset": "earliest",
        # Not "enable.auto.commit": "false": with it, Pathway 0.33's reader fails the job at
        # its first batch (a KeyError from `ix`, a row id missing); a fresh group.id per run
        # is what makes every run read the topics from the start.
    }
    # One consumer group per connector: sharing one, the second connector's join makes the
    # group rebalance, and the refunds' first batch then came a batch (1.5 s) later.
    orders = pw.io.kafka.read(
        {**settings, "group.id": f"{args.group}-orders"},
        topic=args.orders_topic,
        format="json",
        schema=schemas()[0],
        autocommit_duration_ms=args.autocommit_ms,
        name="orders",
    )
    refunds = pw.io.kafka.read(
        {**settings, "group.id": f"{args.group}-refunds"},
        topic=args.refunds_topic,
        format="json",
        schema=schemas()[1],
        autocommit_duration_ms=args.autocommit_ms,
        name="refunds",
    )
    merged = payments(orders, refunds)
    result = positive(per_buyer_day(first_generated(merged)))
    counted = merged.reduce(n=pw.reducers.count())  # input rows, counted in the engine

    sink = InMemorySink()

    def on_done(done: Done) -> None:
        print(
            json.dumps(
                {
                    "event": "done",
                    "at": time_now(),
                    "started": started,
                    "first_output": done.first_seen,
                    "input_rows": done.count,
                    "result_rows": len(sink.rows),
                    "cpu_s": time.process_time(),
                    "peak_rss_mb": round(_rss_peak_mb(), 1),
                }
            ),
            flush=True,
        )
        if args.dump:
            with open(args.dump, "w") as f:
                json.dump(list(sink.rows.values()), f)
            print(json.dumps({"event": "dumped", "path": args.dump}), flush=True)

    done = Done(args.total, on_done)
    pw.io.subscribe(result, on_change=sink.on_change, on_time_end=done.on_result_time_end)
    pw.io.subscribe(counted, on_change=done.on_count)
    print(json.dumps({"event": "graph built", "at": time_now(), "started": started}), flush=True)
    pw.run(monitoring_level=pw.MonitoringLevel.NONE, with_http_server=False)
    sys.exit(0 if done.fired else 1)


if __name__ == "__main__":
    main()
