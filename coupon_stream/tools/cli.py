"""`coupon-stream` command line: worker, intake, produce, generate, show, status, topics,
rescale, grants."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import logging.config
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coupon_stream.connectors import clients
from coupon_stream.connectors.faults import KafkaError, refusal, retry
from coupon_stream.foundation.errors import AccessRefused
from coupon_stream.foundation.logs import logging_config
from coupon_stream.foundation.settings import Settings

log = logging.getLogger("coupon_stream.cli")

# Exit codes: 2 a deployment or configuration refused at start, 3 access refused.
EXIT_CONFIG = 2
EXIT_REFUSED = 3
# The commands that talk to Kafka: a refused login is said at once, not retried as an outage.
KAFKA_COMMANDS = ("produce", "status", "topics", "rescale", "grants")
# What the operator commands that need more than the worker's ACLs do (README, "ACLs").
OPERATIONS = {
    "topics": "creating the input topics (CREATE on them, which the worker's ACLs do not "
    "grant: run it as an administrator)",
    "produce": "writing the input topics (WRITE on them, which the worker's ACLs do not grant)",
}


def load_settings() -> Settings:
    """Settings from the environment; an invalid one exits naming the setting, nothing else."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(map(str, error["loc"]))
            name = f"COUPON_{where.upper()}: " if where else ""
            print(f"coupon-stream: configuration refused: {name}{error['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _prepare(settings: Settings, command: str, *, sink: bool) -> None:
    """Refuse a bad deployment and create the internal topics, before a worker or an intake
    process starts: a refusal exits at once, naming what refused.

    Brokers that do not answer are an outage: waited for, retrying, with a line a minute.
    Started anyway, a worker stopped when Faust's producer could not bootstrap, and an
    intake process's first send could have a broker that creates topics on demand make
    the by-buyer topic with its default partition count, which every worker refuses.
    """
    from coupon_stream.connectors.deployment import (
        DeploymentError,
        check_deployment,
        create_internal_topics,
    )
    from coupon_stream.connectors.mysql import ResultSink

    async def topics() -> None:
        try:
            await check_deployment(settings)
            await create_internal_topics(settings)
        except KafkaError as exc:
            refused = clients.kafka_refused(settings, exc, "preparing the internal topics")
            if refused is not None:
                raise refused from exc
            raise

    def failed(exc: BaseException, delay: float) -> None:
        log.warning(
            "the internal topics could not be checked or created (%r): the %s waits for the "
            "brokers %s, tried again in %.1f s",
            exc,
            command,
            settings.bootstrap_servers,
            delay,
        )

    async def prepare() -> None:
        await clients.check_kafka_access(settings)
        if sink:
            await ResultSink.of(settings).check_access()
        await retry(lambda: asyncio.wait_for(topics(), 60), failed=failed)

    try:
        asyncio.run(prepare())
    except AccessRefused as exc:
        log.critical("access refused, not starting: %s", exc)
        raise SystemExit(EXIT_REFUSED) from None
    except DeploymentError as exc:
        # Starting anyway would misroute buyers or misread state.
        print(f"coupon-stream {command}: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except Exception as exc:  # noqa: BLE001 - what no retry can fix (faults.classify)
        log.critical("the internal topics could not be prepared, not starting: %r", exc)
        raise SystemExit(1) from None


def _worker(extra: list[str]) -> None:
    settings = load_settings()
    logging.config.dictConfig(logging_config(settings.log_format, settings.log_level))
    _prepare(settings, "worker", sink=True)
    from coupon_stream.app import CouponStream  # after the checks: a refusal comes fast

    stream = CouponStream(settings)
    if not any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") for a in extra):
        extra = ["--loglevel", settings.log_level, *extra]
    sys.argv = ["coupon-stream", "worker", *extra]
    _collect_garbage_less_often()
    stream.app.main()


def _collect_garbage_less_often() -> None:
    """Keep CPython's cycle collector off the hot path.

    A batch allocates hundreds of thousands of short-lived lists and tuples. With the
    default thresholds (700, 10, 10) a collection ran every few records and the full ones
    walked every long-lived Faust and aiokafka object: over a quarter of the worker's CPU.
    Records form no reference cycles, so collecting less often costs little memory; the
    objects of start-up are frozen out of the collections entirely.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _intake(args: argparse.Namespace) -> None:
    from coupon_stream.app import intake_process

    settings = load_settings()
    logging.config.dictConfig(logging_config(settings.log_format, settings.log_level))
    _prepare(settings, "intake", sink=False)
    _collect_garbage_less_often()
    try:
        asyncio.run(intake_process.run(settings))
    except AccessRefused as exc:
        log.critical("access refused, stopping the intake: %s", exc)
        raise SystemExit(EXIT_REFUSED) from None
    except Exception as exc:
        log.critical("the intake failed for good, stopping: %r", exc)
        raise SystemExit(1) from None


def _produce(args: argparse.Namespace) -> None:
    from coupon_stream.tools.producer import read_lines, send_all

    settings = load_settings()
    batches = []
    if args.orders:
        batches.append((settings.orders_topic, read_lines(args.orders)))
    if args.refunds:
        batches.append((settings.refunds_topic, read_lines(args.refunds)))
    if not batches:
        raise SystemExit("produce: give --orders FILE and/or --refunds FILE")
    sent = asyncio.run(send_all(settings, batches, progress=not args.quiet))
    print(f"produced {sent} messages to {settings.broker}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    from coupon_stream.tools.dataset import generate, write

    dataset = generate(args.orders, seed=args.seed)
    orders, refunds = write(dataset, args.out)
    print(f"{len(dataset.orders)} order messages -> {orders}")
    print(f"{len(dataset.refunds)} refund messages -> {refunds}")


def _show(args: argparse.Namespace) -> None:
    from coupon_stream.connectors.mysql import ResultSink

    settings = load_settings()

    async def fetch() -> list[tuple[Any, ...]]:
        sink = ResultSink.of(settings)
        await sink.start()
        try:
            return await sink.fetch_all()
        finally:
            await sink.stop()

    rows = asyncio.run(fetch())
    header = ("buyer_id", "effect_time", "cumulate_amount", "gmt_create", "gmt_modified")
    shown = rows if args.limit <= 0 else rows[: args.limit]
    table = [header] + [(str(b), str(e), str(a), str(c), str(m)) for c, m, b, a, e in shown]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(
            "  ".join(
                cell.rjust(w) if j < 3 else cell.ljust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    total = sum(r[3] for r in rows)
    print(
        f"{len(rows)} rows in {settings.result_table} ({settings.db_url_safe}); "
        f"sum of cumulate_amount {total}"
    )


def _status(args: argparse.Namespace) -> None:
    from coupon_stream.tools import status

    settings = load_settings()
    if args.until_idle:
        if asyncio.run(status.wait_idle(settings, args.until_idle)) is None:
            raise SystemExit(f"status: still lagging after {args.until_idle}s")
    print(status.render(settings, asyncio.run(status.collect(settings))))


def _topics(args: argparse.Namespace) -> None:
    from coupon_stream.connectors.deployment import create_input_topics

    settings = load_settings()
    created = asyncio.run(create_input_topics(settings, args.partitions))
    print(f"created: {', '.join(created) or 'none (both exist)'}")


def _rescale(args: argparse.Namespace) -> None:
    from coupon_stream.tools.rescale import RescaleUnsafe, rescale

    settings = load_settings()
    try:
        asyncio.run(rescale(settings, args.partitions, args.to_app_id))
    except RescaleUnsafe as exc:
        print(f"coupon-stream rescale: stopped, unsafe: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _grants(args: argparse.Namespace) -> None:
    from coupon_stream.tools import grants

    settings = load_settings()
    try:
        if args.action == "reconcile":
            lines = asyncio.run(grants.reconcile_all(settings, dry_run=args.dry_run))
        elif args.buyer is not None:
            lines = asyncio.run(grants.history(settings, args.buyer, args.day))
        else:
            print("coupon-stream grants: give --buyer ID, or reconcile", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
    except grants.NoPolicy as exc:
        print(f"coupon-stream grants: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        _worker(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="coupon-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a Faust worker (extra arguments go to Faust)")
    p = sub.add_parser(
        "intake",
        help="run the intake alone (orders and refunds to the by-buyer topic), for workers "
        "started with COUPON_INTAKE=false",
    )
    p.set_defaults(func=_intake)
    p = sub.add_parser("produce", help="send JSONL files to the orders and refunds topics")
    p.add_argument("--orders", type=Path)
    p.add_argument("--refunds", type=Path)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_produce)
    p = sub.add_parser("generate", help="write a deterministic demo dataset")
    p.add_argument("--orders", type=int, required=True, help="number of distinct orders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_generate)
    p = sub.add_parser("show", help="print the result table")
    p.add_argument("--limit", type=int, default=50, help="rows to print (0 = all)")
    p.set_defaults(func=_show)
    p = sub.add_parser("status", help="lag per partition, pending writes, rows, dead letters")
    p.add_argument(
        "--until-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait (up to SECONDS) until the group has no lag",
    )
    p.set_defaults(func=_status)
    p = sub.add_parser(
        "topics",
        help="create the input topics if they do not exist (on a secured cluster: needs "
        "CREATE on them, which the worker's ACLs do not grant; run it as an admin)",
    )
    p.add_argument("--partitions", type=int, default=8)
    p.set_defaults(func=_topics)
    p = sub.add_parser(
        "rescale",
        help="move the stopped app's state (COUPON_APP_ID) to a new app id with another "
        "partition count; run again with the same arguments after an interruption",
    )
    p.add_argument("--partitions", type=int, required=True, help="the new partition count")
    p.add_argument("--to-app-id", required=True, help="the new app id (no state yet)")
    p.set_defaults(func=_rescale)
    p = sub.add_parser(
        "grants",
        help="a buyer's totals, tiers and grant history (--buyer); or `reconcile`: every day "
        "re-judged under the current policy, only the differences sent and written",
    )
    p.add_argument("action", nargs="?", choices=["reconcile"])
    p.add_argument("--buyer", type=int)
    p.add_argument("--day", type=int, metavar="YYYYMMDD")
    p.add_argument("--dry-run", action="store_true", help="reconcile: list, change nothing")
    p.set_defaults(func=_grants)
    args = parser.parse_args(argv)
    try:
        if args.command in KAFKA_COMMANDS:
            asyncio.run(clients.check_kafka_access(load_settings()))
        args.func(args)
    except Exception as exc:
        if refusal(exc) is None:
            raise
        refused = exc if isinstance(exc, AccessRefused) else None
        doing = OPERATIONS.get(args.command, f"running `coupon-stream {args.command}`")
        refused = refused or clients.kafka_refused(load_settings(), exc, doing, worker=False)
        print(f"coupon-stream {args.command}: access refused: {refused}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None


if __name__ == "__main__":
    main()
