"""`make bench`: throughput on skewed, hot-buyer and uniform input, and at 4x the size.

Runs against the local Kafka and MariaDB of `make up`. Every run uses fresh topics and
consumer groups, loads its whole dataset before timing, and the results go to
bench/results/<ts>.json and .md. In one invocation, in this order:

  - load the default dataset (`--orders` orders, buyers Zipf-like: `skew="zipf"`), measure
    the raw consume floor and the pipeline floor on it;
  - one worker on a uniform dataset of the same size (the baseline), then one worker on the
    default dataset, the same with its intake in a process of its own (`coupon-stream
    intake`, COUPON_INTAKE=false: two processes, their CPU added), then two workers on it;
  - one worker on a hot-buyer dataset (30% of the orders on one buyer), same size;
  - one worker on a Zipf-like dataset of 4x the orders;
  - restores of the default and the 4x state (empty data dir, kill -9 with and without the
    data dir), a rescale of the default state to twice its partitions, and takeovers of a
    state that size by a second worker with and without a standby;
  - latency at half of the skewed one-worker events/s of the same run, the rate of issue 28
    (`--latency-rate`: `half`, the default, or a fixed rate), measured by a poller
    reading a primary-key range (bench/latency.py; `python -m bench.latency` runs it alone).

Each worker run reports events/s, worker CPU s per 1M events (numerically the same as CPU
microseconds per event) and the ratio to the raw floor; the markdown checks the goals of
issue 28. `--quick` skips the two-worker, restore and latency parts (a smoke run:
`python -m bench.run --orders 20000 --quick`).

Usage: python -m bench.run [--orders N] [--partitions P] [--quick] [--skip-two]
       [--latency-rate R|half] [--latency-seconds S] [--latency-warmup W] [--chunk-orders C]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka import Producer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from bench.data import CHUNK_ORDERS, chunk_sizes, encoded_chunk
from bench.latency import HALF, Probes, half_capacity, rate_arg, summary_ms
from bench.pipeline_floor import pipeline_floor
from coupon_stream.connectors import deployment
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools import status
from coupon_stream.tools.dataset import Skew
from coupon_stream.tools.producer import bulk_producer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BOOTSTRAP = "127.0.0.1:9092"
DB_URL = os.environ.get(
    "COUPON_BENCH_DB_URL", "mysql+asyncmy://coupons:coupons@127.0.0.1:3306/coupons"
)
WORKER = [str(Path(sys.executable).with_name("coupon-stream")), "worker"]
INTAKE = [str(Path(sys.executable).with_name("coupon-stream")), "intake"]
INTAKE_PORTS = 6200  # the intake processes' web ports: 6200, 6201, ...
SEED = 1
DEFAULT_ORDERS = 1_000_000
QUICK_ORDERS = 20_000
# Goals of issue 28 (ratios, since absolute rates differ between machines).
GOAL_OF_SKEWED = 0.8  # uniform and hot events/s, each at least this share of skewed
GOAL_CPU_GROWTH_AT_4X = 1.2  # CPU per event at 4x the input, at most this times the default
GOAL_OF_RAW_FLOOR = 0.25  # one worker on the skewed default, at least this share of raw floor
APART = "skewed, intake apart"  # the run of one worker with its intake in a process of its own
GOAL_TWO_WORKERS = 1.8  # two workers' events/s, at least this times one worker's
GOAL_P99_MS = 1000  # produce-to-visible p99 at half of one worker's capacity, at most this


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "faust-streaming": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "sqlalchemy": version("sqlalchemy"),
        "rocksdict": version("rocksdict"),
        "kafka": _kafka_version(),
        "mariadb": _mariadb_version(),
    }


def _kafka_version() -> str:
    """The broker's version, from the jar `make up` installed (kafka_<scala>-<version>.jar)."""
    jars = sorted((ROOT / ".local" / "kafka" / "libs").glob("kafka_2.*-*.jar"))
    names = [j.stem.split("-", 1)[1] for j in jars if j.stem.count("-") == 1]
    return names[0] if names else "unknown"


def _mariadb_version() -> str:
    try:
        out = subprocess.run(
            ["mariadb", "--version"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    words = out.stdout.split()
    # "mariadb  Ver 15.1 Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64) ..."
    return next((w.rstrip(",") for w in words if "MariaDB" in w), out.stdout.strip())


def settings_for(run: str, topics: str, partitions: int, data_dir: Path, port: int) -> Settings:
    return Settings(
        broker=f"kafka://{BOOTSTRAP}",
        db_url=DB_URL,
        app_id=run,
        orders_topic=f"{topics}-orders",
        refunds_topic=f"{topics}-refunds",
        dlq_topic=f"{topics}-dlq",
        result_table=f"bench_{run.replace('-', '_')}",
        partitions=partitions,
        data_dir=data_dir,
        web_port=port,
    )


def env_of(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in s.model_dump().items():
        if value is None:
            continue  # unset (no Kafka security): the worker's default
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"COUPON_{name.upper()}"] = str(raw.value if hasattr(raw, "value") else raw)
    return env


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss(run: dict[str, Any]) -> str:
    """A run's peak RSS for a table: the worker's, and its intake process's if apart."""
    apart = run.get("intake_peak_rss_mb")
    return f"{run['peak_rss_mb']}" if apart is None else f"{run['peak_rss_mb']}; {apart}"


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MachineCpu:
    """CPU seconds of the broker, the database and the whole machine over one run.

    They share the cores with the workers, so a run's events/s is bounded by their cost too.
    """

    PID_FILES = {
        "kafka": ROOT / ".local" / "kafka" / "kafka.pid",
        "mariadb": ROOT / ".local" / "mariadb" / "mariadbd.pid",
    }

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        for name, pid_file in self.PID_FILES.items():
            try:
                self.pids[name] = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        sample: dict[str, float] = {}
        for name, pid in self.pids.items():
            try:
                sample[name] = _cpu_of(pid)
            except OSError:
                continue
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        sample["busy"] = (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
        return sample

    def since_start(self, total: int, elapsed: float) -> dict[str, Any]:
        end = self._sample()
        used = {k: end[k] - self.start[k] for k in end if k in self.start}
        out = {
            f"{name}_cpu_s_per_million": round(used[name] / total * 1e6, 1)
            for name in self.pids
            if name in used
        }
        out["machine_busy_pct"] = round(used["busy"] / (elapsed * (os.cpu_count() or 1)) * 100)
        return out


class Proc:
    """A worker process, or with `intake` a `coupon-stream intake` process."""

    def __init__(
        self, s: Settings, log: Path, loglevel: str = "warn", intake: bool = False
    ) -> None:
        self.settings = s
        self.proc = subprocess.Popen(
            INTAKE if intake else [*WORKER, "--loglevel", loglevel, "--web-port", str(s.web_port)],
            env=env_of(s),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def cpu_seconds(self) -> float:
        return _cpu_of(self.proc.pid)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def metric(self, name: str) -> float:
        return self.metrics(name)[0]

    def metrics(self, *names: str) -> list[float]:
        """Each metric's value summed over its series, from one scrape of /metrics."""
        url = f"http://127.0.0.1:{self.settings.web_port}/metrics"
        lines = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
        return [
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in lines
                if line.startswith(name + " ") or line.startswith(name + "{")
            )
            for name in names
        ]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}")
        try:
            url = f"http://127.0.0.1:{self.settings.web_port}/health/ready"
            return bool(urllib.request.urlopen(url, timeout=2).status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """`kill -9`: no shutdown, no leaving the group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()  # its web port is free before the next run starts


async def send_values(
    producer: AIOKafkaProducer, topic: str, values: list[bytes], partitions: int, seed: int
) -> int:
    """Send values without keys, each to a random partition, in whole batches; all acked.

    What `coupon_stream.tools.producer.send_all` does (the default partitioner also picks a random
    partition for a message without a key), five times faster: the bench sends ~11M.
    """
    rng = random.Random(seed)
    batches = [producer.create_batch() for _ in range(partitions)]
    acks: list[asyncio.Future[Any]] = []
    for value in values:
        p = rng.randrange(partitions)
        if batches[p].append(key=None, value=value, timestamp=None) is None:  # full
            batches[p].close()
            acks.append(await producer.send_batch(batches[p], topic, partition=p))
            batches[p] = producer.create_batch()
            if batches[p].append(key=None, value=value, timestamp=None) is None:
                raise ValueError(f"a message of {len(value)} bytes is larger than a batch")
    for p, batch in enumerate(batches):
        if batch.record_count():
            batch.close()
            acks.append(await producer.send_batch(batch, topic, partition=p))
    await asyncio.gather(*acks)
    return len(values)


async def load(
    topics: str, partitions: int, orders: int, skew: Skew, chunk: int = CHUNK_ORDERS
) -> int:
    """Create the input topics and send a dataset to them (see bench/data.py); messages sent.

    Two spawned processes generate and encode chunks while this one sends the previous.
    """
    s = settings_for("load", topics, partitions, Path("/nonexistent"), 0)
    await deployment.create_input_topics(s, partitions)
    sizes = chunk_sizes(orders, chunk)
    buyers = max(1, orders // 4)
    loop = asyncio.get_running_loop()
    sent = 0
    producer = bulk_producer(Settings(broker=BOOTSTRAP))
    await producer.start()
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=min(2, len(sizes)), mp_context=context) as pool:
            todo = iter(enumerate(sizes))
            pending: deque[tuple[int, asyncio.Future[tuple[list[bytes], list[bytes]]]]]
            pending = deque()
            while True:
                while len(pending) < 3 and (item := next(todo, None)) is not None:
                    k, size = item
                    pending.append(
                        (k, loop.run_in_executor(pool, encoded_chunk, size, SEED + k, buyers, skew))
                    )
                if not pending:
                    return sent
                k, chunk_values = pending.popleft()
                order_values, refund_values = await chunk_values
                sent += await send_values(
                    producer, s.orders_topic, order_values, partitions, seed=2 * k
                )
                sent += await send_values(
                    producer, s.refunds_topic, refund_values, partitions, seed=2 * k + 1
                )
    finally:
        await producer.stop()


async def delete_topics(marker: str) -> int:
    """Delete every topic whose name holds `marker` (a run's stamp): a `make bench` leaves
    about 10 GB of topics, and a broker with too much data in it starts too slowly."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if marker in t]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
    return len(names)


async def raw_floor(topics: str, total: int) -> float:
    """The most a Python consumer does here: read both topics and JSON-decode every value."""
    consumer = AIOKafkaConsumer(
        f"{topics}-orders",
        f"{topics}-refunds",
        bootstrap_servers=BOOTSTRAP,
        group_id=f"floor-{time.time_ns()}",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    seen, start = 0, time.perf_counter()
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for r in records:
                    orjson.loads(r.value)
                seen += len(records)
    finally:
        await consumer.stop()
    return total / (time.perf_counter() - start)


class Progress:
    """Source messages consumed and records applied over a run, from the workers' metrics.

    Intake and the state stage share a worker's one thread. Once intake has consumed the
    whole input, the state stage runs alone: its rate then, next to intake's while both ran,
    shows which of the two bounds the worker.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.samples: list[tuple[float, float, float]] = []  # (seconds, consumed, applied)

    def sample(self, procs: list[Proc], at: float) -> None:
        try:
            scraped = [
                p.metrics("coupon_messages_consumed_total", "coupon_records_total") for p in procs
            ]
            consumed = sum(c for c, _ in scraped)
            applied = sum(a for _, a in scraped)
        except OSError:
            return  # a worker's web server is not up yet
        self.samples.append((at, consumed, applied))

    def split(self, elapsed: float) -> dict[str, Any]:
        done = next(((t, a) for t, c, a in self.samples if c >= self.total), None)
        if done is None or not self.samples:
            return {}
        intake_s, applied_then = done
        applied = self.samples[-1][2]
        alone = elapsed - intake_s
        return {
            "intake_done_s": round(intake_s, 1),
            "intake_events_per_s": round(self.total / intake_s) if intake_s else None,
            "state_alone_events_per_s": round((applied - applied_then) / alone)
            if alone >= 3
            else None,
        }


async def run_workers(
    run: str,
    topics: str,
    partitions: int,
    n: int,
    total: int,
    tmp: Path,
    standbys: int = 0,
    intake_apart: bool = False,
) -> dict[str, Any]:
    """`n` workers until the input is drained. With `intake_apart` (or COUPON_INTAKE=false in
    the environment) each worker leaves its intake to a `coupon-stream intake` process of its
    own, whose CPU counts with the workers'."""
    procs = []
    intakes = []
    for i in range(n):
        s = settings_for(run, topics, partitions, tmp / f"{run}-{i}", 6100 + i)
        s.standby_replicas = standbys
        s.intake = s.intake and not intake_apart
        procs.append(Proc(s, tmp / f"{run}-{i}.log"))
        if not s.intake:
            apart = s.model_copy(update={"web_port": INTAKE_PORTS + i})
            intakes.append(Proc(apart, tmp / f"{run}-{i}-intake.log", intake=True))
    start = time.monotonic()  # the clock of `wait_idle`'s answer
    machine_cpu = MachineCpu()
    try:
        idle = asyncio.ensure_future(status.wait_idle(procs[0].settings, 3600))
        progress = Progress(total)
        while not idle.done():
            dead = [p for p in procs + intakes if p.proc.poll() is not None]
            if dead:
                idle.cancel()
                raise RuntimeError(f"{run}: a worker exited, see {tmp}")
            progress.sample(procs, time.monotonic() - start)
            await asyncio.sleep(0.5)
        drained = idle.result()
        if drained is None:
            raise RuntimeError(f"{run} did not drain")
        elapsed = drained - start
        progress.sample(procs, elapsed)
        cpu = sum(p.cpu_seconds() for p in procs + intakes)
        scraped = [
            p.metrics(
                "coupon_sink_statements_total",
                "coupon_rows_upserted_total",
                "coupon_rows_deleted_total",
            )
            for p in procs
        ]
        statements = sum(n for n, _, _ in scraped)
        rows = sum(upserted + deleted for _, upserted, deleted in scraped)
        return {
            "workers": n,
            "intake_processes": len(intakes),
            "seconds": round(elapsed, 2),
            "events_per_s": round(total / elapsed),
            "cpu_s_per_million": round(cpu / total * 1e6, 1),
            "peak_rss_mb": round(max(p.peak_rss_mb() for p in procs), 1),
            # A worker's own intake is in its RSS; one apart has its own.
            "intake_peak_rss_mb": round(max(p.peak_rss_mb() for p in intakes), 1)
            if intakes
            else None,
            "sql_statements_per_event": round(statements / total, 5),
            "rows_written_per_event": round(rows / total, 4),
            **machine_cpu.since_start(total, time.monotonic() - start),
            **progress.split(elapsed),
        }
    finally:
        for p in intakes + procs:
            p.stop()


LATENCY_POLL_S = 0.02  # a poll starts every 20 ms (later if the one before took longer)
LATENCY_FIRST_BUYER = 900_000_000
LATENCY_DAY = 20261111  # every probe's pay_time is on this day
LATENCY_FEE = 10_000  # each probe's div_idx_actual_total_fee: cumulate_amount 100
LATENCY_LINGER_MS = 5  # librdkafka's default
LATENCY_WARMUP_S = 2.0  # probes of the first seconds are sent at the rate but not counted


def cpu_by_kind(worker: int) -> dict[str, float]:
    """CPU seconds so far of the worker, this bench, the broker and the database (found in
    /proc by their command lines), and of the whole machine ("busy", all cores)."""
    out = dict.fromkeys(("worker", "bench", "kafka", "mariadb"), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        try:
            cmdline = (stat.parent / "cmdline").read_bytes()
            cpu = _cpu_of(pid)
        except OSError:
            continue  # gone meanwhile
        kind = (
            "worker"
            if pid == worker
            else "bench"
            if pid == os.getpid()
            else "kafka"
            if b"kafka.Kafka" in cmdline
            else "mariadb"
            if cmdline.split(b"\0", 1)[0].endswith(b"mariadbd")
            else None
        )
        if kind:
            out[kind] += cpu
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    out["busy"] = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_shares(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, int]:
    """Each kind's share of one core over `seconds`, in %; "other": what the rest of the
    machine's busy time leaves (other programs on it); "machine": busy share of all cores."""
    used = {k: after[k] - before[k] for k in before}
    out = {f"{k}_pct_of_core": round(used[k] / seconds * 100) for k in used if k != "busy"}
    known = sum(v for k, v in used.items() if k != "busy")
    out["other_pct_of_core"] = round(max(0.0, used["busy"] - known) / seconds * 100)
    out["machine_busy_pct"] = round(used["busy"] / (seconds * (os.cpu_count() or 1)) * 100)
    return out


async def latency(
    run: str,
    partitions: int,
    rate: int,
    seconds: float,
    tmp: Path,
    warmup: float = LATENCY_WARMUP_S,
) -> dict[str, Any]:
    """Produce at a fixed rate; time from send to the row being visible in MySQL.

    Each probe is a new buyer with increasing ids (`bench.latency.Probes`): the poller reads
    the primary-key range from the oldest probe not seen yet to the newest sent, every
    20 ms, so its cost does not grow with the table; its own time per poll is reported.
    The percentiles are of the `seconds` after a `warmup` at the same rate (a worker's
    first second after start is slower; the warm-up's max is reported on its own).
    """
    topics = f"{run}-lat"
    s = settings_for(run, topics, partitions, tmp / run, 6150)
    await deployment.create_input_topics(s, partitions)
    proc = Proc(s, tmp / f"{run}.log")
    engine = create_async_engine(DB_URL, isolation_level="AUTOCOMMIT")  # a fresh read each poll
    # librdkafka, as the merchants' services would produce: each send is a C call and the
    # I/O runs on librdkafka's threads, so the bench's own sending takes little of the
    # cores it shares with the worker (aiokafka's send is a Python coroutine per message).
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": LATENCY_LINGER_MS})
    probes = Probes(LATENCY_FIRST_BUYER, amount=LATENCY_FEE // 100)
    polls: list[float] = []  # seconds each poll took (query, fetch and bookkeeping)
    rows_read: list[int] = []
    errors = 0  # polls that failed (none expected: the worker creates the table at start)
    query = text(
        f"SELECT buyer_id, cumulate_amount FROM `{s.result_table}` "
        "WHERE buyer_id >= :low AND buyer_id < :high AND effect_time = :day"
    )
    pay_time = f"{str(LATENCY_DAY)[:4]}-{str(LATENCY_DAY)[4:6]}-{str(LATENCY_DAY)[6:]} 12:00:00"
    try:
        while not proc.ready():
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)

        async def poll() -> None:
            nonlocal errors
            async with engine.connect() as conn:
                while True:
                    began = time.perf_counter()
                    keys = probes.key_range()
                    if keys is not None:
                        try:
                            result = await conn.execute(
                                query, {"low": keys[0], "high": keys[1], "day": LATENCY_DAY}
                            )
                            rows = [(int(b), int(a)) for b, a in result]
                        except DBAPIError:
                            errors += 1
                            rows = []
                        probes.observe(rows, time.perf_counter())
                        polls.append(time.perf_counter() - began)
                        rows_read.append(len(rows))
                    await asyncio.sleep(max(0.0, began + LATENCY_POLL_S - time.perf_counter()))

        poller = asyncio.ensure_future(poll())
        warm = int(rate * warmup)
        total = warm + int(rate * seconds)
        start = time.perf_counter()
        cpu: dict[str, float] | None = None  # from the end of the warm-up
        checkpoints: list[float] = []  # the worker's checkpoints: how many, seconds in them
        acked: dict[int, float] = {}  # probe -> when the broker acknowledged it

        failed: list[str] = []

        def on_ack(i: int, err: object, _: object) -> None:
            if err is not None:
                failed.append(str(err))
            acked.setdefault(i, time.perf_counter())

        template = (
            b'{"biz_order_id":"lat-%d","pay_status":"2","buyer_id":"%d","pay_time":"'
            + pay_time.encode()
            + b'","div_idx_actual_total_fee":%d}'
        )
        while len(probes.sent) < total:  # every probe due by now, then sleep till the next
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while len(probes.sent) < due:
                if cpu is None and len(probes.sent) >= warm:
                    cpu = cpu_by_kind(proc.proc.pid)
                    checkpoints = checkpoint_totals(proc)
                buyer = probes.send(time.perf_counter())
                value = template % (buyer, buyer, LATENCY_FEE)
                producer.produce(
                    s.orders_topic,
                    value,
                    on_delivery=functools.partial(on_ack, len(probes.sent) - 1),
                )
            producer.poll(0)  # acknowledgements: their callbacks run here
            await asyncio.sleep(max(0.0, start + len(probes.sent) / rate - time.perf_counter()))
        sending = time.perf_counter() - start
        assert cpu is not None
        shares = cpu_shares(cpu, cpu_by_kind(proc.proc.pid), sending - warm / rate)
        count, spent, *steps = (
            b - a for a, b in zip(checkpoints, checkpoint_totals(proc), strict=True)
        )
        await asyncio.to_thread(producer.flush, 30)
        if failed:
            raise RuntimeError(f"{len(failed)} probe(s) not sent, the first: {failed[0]}")
        deadline = time.perf_counter() + 120
        while probes.key_range() is not None and time.perf_counter() < deadline:
            if poller.done():
                poller.result()  # raise what stopped it
            await asyncio.sleep(0.2)
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        measured = probes.latencies(start=warm)
        out: dict[str, Any] = {
            "rate": rate,
            "seconds": seconds,
            "messages": total - warm,
            "sent_per_s": round(total / sending),
            "seen": len(measured),
            "wrong_amount_reads": probes.wrong,
            "warmup_s": warmup,
            "warmup_max_ms": round(max(probes.latencies(stop=warm), default=0) * 1000, 1),
            **summary_ms(measured),
            "poll_period_ms": LATENCY_POLL_S * 1000,
            "poll": summary_ms(polls),
            "poll_rows_mean": round(sum(rows_read) / len(rows_read), 1) if rows_read else None,
            "poll_rows_max": max(rows_read, default=None),
            "poll_errors": errors,
            # Send -> acknowledged by the broker: the part of the latency before the worker.
            "ack": summary_ms(acked[i] - probes.sent[i] for i in acked if i >= warm),
            # While the measured probes were sent: the worker's checkpoints (a row is visible
            # after the one that follows its record) and who used the cores.
            "checkpoints_per_s": round(count / (sending - warm / rate), 2),
            "checkpoint_mean_ms": round(1000 * spent / count, 1) if count else None,
            "checkpoint_step_mean_ms": {
                step: round(1000 * t / count, 1) if count else None
                for step, t in zip(CHECKPOINT_STEPS, steps, strict=True)
            },
            **shares,
        }
        out.pop("count")
        return out
    finally:
        producer.flush(5)
        await engine.dispose()
        proc.stop()


CHECKPOINT_STEPS = ("derive", "changelog", "local", "sink", "offsets")


def checkpoint_totals(proc: Proc) -> list[float]:
    """The worker's checkpoints so far, the seconds they took, and the seconds of each step."""
    return proc.metrics(
        "coupon_checkpoint_seconds_count",
        "coupon_checkpoint_seconds_sum",
        *(f'coupon_checkpoint_step_seconds_sum{{step="{s}"}}' for s in CHECKPOINT_STEPS),
    )


def latency_lines(lat: dict[str, Any]) -> list[str]:
    """The latency part's report: produce -> visible percentiles and the poller's own cost."""
    if "p50_ms" not in lat:
        return [f"\nLatency at {lat['rate']} events/s: no probe seen"]
    poll, ack = lat["poll"], lat["ack"]
    lines = [
        f"\nLatency produce -> visible in MySQL at {lat['rate']} events/s "
        f"({lat['sent_per_s']} sent/s): p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms, "
        f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms ({lat['seen']}/{lat['messages']} "
        f"seen; {lat['wrong_amount_reads']} reads of a probe's row with another amount), "
        f"over {lat['seconds']:g} s after a warm-up of {lat['warmup_s']:g} s at the same rate "
        f"(not counted; its max {lat['warmup_max_ms']} ms).",
        f"Poller: a primary-key range read from the oldest unseen probe every "
        f"{lat['poll_period_ms']:g} ms; {poll['count']} polls, each p50 {poll['p50_ms']} ms, "
        f"p99 {poll['p99_ms']} ms, max {poll['max_ms']} ms, {lat['poll_rows_mean']} rows "
        f"(max {lat['poll_rows_max']}) a poll, {lat['poll_errors']} failed.",
        f"Send -> acknowledged by the broker: p50 {ack.get('p50_ms')} ms, p99 "
        f"{ack.get('p99_ms')} ms, max {ack.get('max_ms')} ms. While the measured probes were "
        f"sent: {lat['checkpoints_per_s']} checkpoints/s of the worker, each "
        f"{lat['checkpoint_mean_ms']} ms on average ("
        + ", ".join(f"{k} {v}" for k, v in lat["checkpoint_step_mean_ms"].items())
        + f" ms); % of one core: worker "
        f"{lat['worker_pct_of_core']}, this bench (producer and "
        f"poller) {lat['bench_pct_of_core']}, Kafka {lat['kafka_pct_of_core']}, MariaDB "
        f"{lat['mariadb_pct_of_core']}, other programs {lat['other_pct_of_core']}; machine "
        f"{lat['machine_busy_pct']}% busy.",
    ]
    if "half_capacity" in lat:
        lines.append(
            f"Half of one worker's capacity (its skewed events/s in this run / 2, issue 28's "
            f"rate): {lat['half_capacity']} events/s."
        )
    return lines


RESTORED = re.compile(r"restored (\d+) changelog records into \d+ active partitions in ([\d.]+) s")
RESTORE_CASES = ("empty data dir", "kill -9, same data dir", "kill -9, data dir gone")


def restore_of(log: Path) -> tuple[int, float]:
    """The records and seconds of the last restore a worker's log reports (0, 0.0 if none)."""
    found = RESTORED.findall(log.read_text(errors="replace"))
    return (int(found[-1][0]), float(found[-1][1])) if found else (0, 0.0)


async def restore(run: str, topics: str, partitions: int, tmp: Path) -> dict[str, Any]:
    """One worker's app whose changelogs are full: a worker with empty local state; then
    `kill -9` and a worker on the same data dir; then `kill -9` and one with the dir gone.

    Each reports its time to ready (the session timeout included after a kill: the group
    waits that long for the dead member) and its restore's own records/s from the log.
    """
    s = settings_for(run, topics, partitions, tmp / f"{run}-restore", 6160)
    changelogs = list(s.changelog_topics.values())
    # Offsets ever used (end offsets summed): the records written, and a marker per
    # transaction; compaction may have removed some.
    ends = await status.end_offsets_by_topic(Settings(broker=BOOTSTRAP), changelogs)
    written = sum(sum(by_partition.values()) for by_partition in ends.values())
    present = sum([await records_present(t) for t in changelogs])
    cases: dict[str, Any] = {}
    for i, case in enumerate(RESTORE_CASES):
        if case.endswith("data dir gone"):
            shutil.rmtree(s.data_dir, ignore_errors=True)
        log = tmp / f"{run}-restore-{i}.log"
        proc = Proc(s, log, loglevel="info")  # the restore's own line gives its rate
        start = time.perf_counter()
        try:
            while not proc.ready():
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - start
            read, bulk = proc.metrics(
                "coupon_state_restored_records_total", "coupon_state_bulk_restored_records_total"
            )
        finally:
            if i < len(RESTORE_CASES) - 1:
                proc.kill()
            else:
                proc.stop()
        records, seconds = restore_of(log)
        cases[case] = {
            "seconds_to_ready": round(elapsed, 2),
            "records_restored": records,
            "restore_s": seconds,
            "restore_records_per_s": round(records / seconds) if seconds else None,
            "records_read_by_faust_recovery": int(read - bulk),
        }
    return {
        "changelog_records_written": written,
        "changelog_records_present": present,
        "cases": cases,
    }


async def rescale_bench(
    run: str, topics: str, partitions: int, tmp: Path, floor: float
) -> dict[str, Any]:
    """`coupon-stream rescale` of a stopped, drained app's state to twice its partitions."""
    from coupon_stream.tools.rescale import rescale

    s = settings_for(run, topics, partitions, tmp / f"{run}-rescale", 6160)
    started = time.perf_counter()
    mark = await rescale(s, 2 * partitions, f"{run}-x2", say=lambda line: None)
    seconds = time.perf_counter() - started
    return {
        "from_partitions": partitions,
        "to_partitions": 2 * partitions,
        "records": mark.records,
        "seconds": round(seconds, 2),
        "records_per_s": round(mark.records / seconds),
        "ratio_to_raw_floor": _ratio(mark.records / seconds, floor),
    }


async def records_present(topic: str) -> int:
    """Records a topic still holds: what a restore reads once compaction has run."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await status.partitions_of(consumer, [topic])
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        count = 0
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            count += sum(len(records) for records in batch.values())
        return count
    finally:
        await consumer.stop()


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def compare(result: dict[str, Any]) -> None:
    """Ratios to the raw floor and to the skewed run, and issue 28's goals, into `result`."""
    floor = result["raw_floor_events_per_s"]
    runs = {r["label"]: r for r in result["runs"]}
    skewed, x4 = runs["skewed"], runs["skewed 4x"]
    for r in result["runs"]:
        r["ratio_to_raw_floor"] = _ratio(r["events_per_s"], floor)
        if r["workers"] == 1:
            r["ratio_to_skewed"] = _ratio(r["events_per_s"], skewed["events_per_s"])
    cpu_growth = _ratio(x4["cpu_s_per_million"], skewed["cpu_s_per_million"])
    goals = [
        {
            "goal": f"{label} events/s >= {GOAL_OF_SKEWED} of skewed",
            "value": runs[label]["ratio_to_skewed"],
        }
        for label in ("uniform", "hot")
    ]
    goals += [
        {
            "goal": f"CPU per event at 4x <= {GOAL_CPU_GROWTH_AT_4X}x the default size",
            "value": cpu_growth,
            "pass": cpu_growth is not None and cpu_growth <= GOAL_CPU_GROWTH_AT_4X,
        },
        {
            "goal": f"one worker on skewed default >= {GOAL_OF_RAW_FLOOR} of raw floor",
            "value": skewed["ratio_to_raw_floor"],
            "pass": skewed["ratio_to_raw_floor"] >= GOAL_OF_RAW_FLOOR,
        },
    ]
    if APART in runs:
        apart = runs[APART]["ratio_to_raw_floor"]
        goals.append(
            {
                "goal": f"one worker, its intake in a process of its own (two processes), on "
                f"skewed default >= {GOAL_OF_RAW_FLOOR} of raw floor",
                "value": apart,
                "pass": apart is not None and apart >= GOAL_OF_RAW_FLOOR,
            }
        )
    for goal in goals[:2]:
        goal["pass"] = goal["value"] is not None and goal["value"] >= GOAL_OF_SKEWED
    scaling = result.get("scaling_ratio")
    if scaling is not None:
        goals.append(
            {
                "goal": f"two workers >= {GOAL_TWO_WORKERS}x one (Kafka and MariaDB share the "
                "cores here: see docs/performance.md)",
                "value": round(scaling, 3),
                "pass": scaling >= GOAL_TWO_WORKERS,
            }
        )
    lat = result.get("latency")
    if lat and lat.get("p99_ms") is not None and lat["rate"] == lat.get("half_capacity"):
        goals.append(
            {
                "goal": f"p99 produce -> visible <= {GOAL_P99_MS} ms at half of one worker's "
                "capacity",
                "value": lat["p99_ms"],
                "pass": lat["p99_ms"] <= GOAL_P99_MS,
            }
        )
    result["goals"] = goals


def _row(cells: list[object]) -> str:
    return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"


def save_results(name: str, result: dict[str, Any], md: str) -> None:
    """`bench/results/<name>.json` and `.md`, and the markdown printed: every bench's way out."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(md)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    floor = result["raw_floor_events_per_s"]
    lines = [
        f"Machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, faust-streaming "
        f"{m['faust-streaming']}, aiokafka {m['aiokafka']}, Kafka {m['kafka']}, "
        f"MariaDB {m.get('mariadb', 'unknown')}, "
        f"SQLAlchemy {m['sqlalchemy']}, rocksdict {m['rocksdict']}.",
        f"Default input: {result['messages']} messages ({result['orders']} orders + copies + "
        f"refunds, buyers Zipf-like), {result['partitions']} partitions. "
        f"Command: `{result['command']}`. Bench took {result['bench_seconds']} s"
        + (" (--quick: no two-worker run, restore or latency)." if result["quick"] else "."),
        f"Raw consume floor (one aiokafka consumer reading and JSON-decoding the default "
        f"input): {floor} events/s.",
        "",
        "| run | orders | events | events/s | worker CPU s per 1M events (= µs/event) "
        "| ratio to raw floor | ratio to skewed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        lines.append(
            _row(
                [
                    r["label"],
                    r["orders"],
                    r["events"],
                    r["events_per_s"],
                    r["cpu_s_per_million"],
                    f"{r['ratio_to_raw_floor']:.3f}",
                    r.get("ratio_to_skewed"),
                ]
            )
        )
    lines += ["", "| goal (issue 28) | measured | result |", "| --- | --- | --- |"]
    for g in result["goals"]:
        lines.append(_row([g["goal"], g["value"], "pass" if g["pass"] else "FAIL"]))
    lines += [
        "",
        "| run | seconds | peak RSS MB (worker; intake process) | SQL statements per event "
        "| rows written per event "
        "| Kafka CPU s per 1M | MariaDB CPU s per 1M | machine busy % | intake done at s "
        "| intake events/s | state stage alone events/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        lines.append(
            _row(
                [
                    r["label"],
                    r["seconds"],
                    rss(r),
                    r["sql_statements_per_event"],
                    r["rows_written_per_event"],
                    r.get("kafka_cpu_s_per_million"),
                    r.get("mariadb_cpu_s_per_million"),
                    r.get("machine_busy_pct"),
                    r.get("intake_done_s"),
                    r.get("intake_events_per_s"),
                    r.get("state_alone_events_per_s"),
                ]
            )
        )
    lines.append(
        '\nskewed: buyers drawn with weight 1/rank^1.1 (`dataset.generate(skew="zipf")`); '
        "hot: 30% of the orders on one buyer, the rest uniform; uniform: the former bench "
        "input. Worker CPU includes its start-up; events/s is timed from the worker's start "
        "to the first of two lag checks, 1 s apart, that found the group drained. Intake and "
        "the state stage share a worker's thread: intake events/s is its rate until it had "
        "consumed the whole input, and the state stage's rate alone is that of the records "
        "it applied after that (from the workers' metrics)."
    )
    pipe = result.get("pipeline_floor")
    if pipe:
        lines.append(
            f"\nPipeline floor (the service's intake and Kafka hops, no state, no database; "
            f"`bench/pipeline_floor.py`): {pipe['events_per_s']} events/s, "
            f"{pipe['cpu_s_per_million']} CPU s per 1M events"
        )
    if "scaling_ratio" in result:
        lines.append(f"\nScaling 2 workers / 1 worker (skewed): {result['scaling_ratio']:.2f}")
    lat = result.get("latency")
    if lat:
        lines += latency_lines(lat)
    floor = result["raw_floor_events_per_s"]
    for label, rs in result.get("restores", {}).items():
        lines += [
            "",
            f"Restore of the {label} state ({rs['changelog_records_present']} changelog records "
            f"present of {rs['changelog_records_written']} written; the rest compacted away), "
            f"one worker, 8 partitions, session timeout 10 s:",
            "",
            "| case | s to ready | records restored | restore s | restore records/s "
            "| ratio to raw floor | read by Faust's recovery |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for case, c in rs["cases"].items():
            rate = c["restore_records_per_s"]
            lines.append(
                _row(
                    [
                        case,
                        c["seconds_to_ready"],
                        c["records_restored"],
                        c["restore_s"],
                        rate,
                        _ratio(rate, floor) if rate else None,
                        c["records_read_by_faust_recovery"],
                    ]
                )
            )
    rsc = result.get("rescale")
    if rsc:
        lines.append(
            f"\nRescale of the default state, {rsc['from_partitions']} -> "
            f"{rsc['to_partitions']} partitions (`coupon-stream rescale`): {rsc['records']} "
            f"records in {rsc['seconds']} s = {rsc['records_per_s']} records/s, "
            f"{rsc['ratio_to_raw_floor']} of the raw floor"
        )
    for t in result.get("takeover", []):
        lines.append(
            f"\nTakeover, 2 workers, {t['changelog_records']} changelog records, "
            f"{t['standby_replicas']} standby: both ready {t['both_workers_ready_s']} s, "
            f"every partition processing again {t['all_partitions_processing_again_after_kill_s']}"
            " s after kill -9"
        )
    return "\n".join(lines)


class Bench:
    """One invocation: its topics' prefix, scratch directory, start time and progress log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.prefix = f"bench-{self.stamp}"
        self.tmp = ROOT / ".local" / "bench" / self.stamp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.began = time.perf_counter()

    def say(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.0f} s] {what}", flush=True)

    async def load(self, topics: str, orders: int, skew: Skew) -> int:
        self.say(f"loading {orders} orders, skew {skew}, into {topics}-* ...")
        total = await load(topics, self.args.partitions, orders, skew, self.args.chunk_orders)
        self.say(f"{total} messages loaded")
        return total

    async def workers(
        self,
        label: str,
        run: str,
        topics: str,
        n: int,
        orders: int,
        total: int,
        skew: Skew,
        standbys: int = 0,
        intake_apart: bool = False,
    ) -> dict[str, Any]:
        self.say(f"{label}: {n} worker(s) on {total} messages ...")
        result = await run_workers(
            run, topics, self.args.partitions, n, total, self.tmp, standbys, intake_apart
        )
        self.say(f"{label}: {result['events_per_s']} events/s")
        return {"label": label, "skew": skew, "orders": orders, "events": total, **result}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--orders",
        type=int,
        default=None,
        help=f"orders in the default dataset ({DEFAULT_ORDERS}; {QUICK_ORDERS} with --quick); "
        "the uniform and hot runs use as many, the 4x run four times as many",
    )
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--latency-rate",
        type=rate_arg,
        default=HALF,
        help="events/s of the latency part, or 'half' (the default): half of this run's "
        "one-worker skewed events/s, the rate issue 28 asks for (half of one worker's capacity)",
    )
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument(
        "--latency-warmup",
        type=float,
        default=LATENCY_WARMUP_S,
        help="seconds at the latency rate before the measured ones, not counted",
    )
    parser.add_argument("--skip-two", action="store_true", help="no two-worker run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: only the one-worker runs (skewed, uniform, hot, 4x) and the floors",
    )
    parser.add_argument(
        "--chunk-orders", type=int, default=CHUNK_ORDERS, help="orders per generated chunk"
    )
    parser.add_argument("--keep-topics", action="store_true", help="keep the run's topics")
    args = parser.parse_args()
    orders = args.orders or (QUICK_ORDERS if args.quick else DEFAULT_ORDERS)
    b = Bench(args)
    topics = b.prefix  # the default (skewed) dataset
    total = await b.load(topics, orders, "zipf")
    b.say("raw floor ...")
    floor = await raw_floor(topics, total)
    b.say(f"raw floor {round(floor)} events/s; pipeline floor ...")
    pipe = await pipeline_floor(BOOTSTRAP, topics, total, args.partitions)
    b.say(f"pipeline floor {pipe['events_per_s']} events/s")

    runs = []
    uniform_topics = f"{b.prefix}-uniform"
    uniform_total = await b.load(uniform_topics, orders, "uniform")
    runs.append(
        await b.workers(
            "uniform", f"{uniform_topics}-w1", uniform_topics, 1, orders, uniform_total, "uniform"
        )
    )
    runs.append(await b.workers("skewed", f"{topics}-w1", topics, 1, orders, total, "zipf"))
    runs.append(  # the same worker, its intake in a `coupon-stream intake` process
        await b.workers(APART, f"{topics}-w1i", topics, 1, orders, total, "zipf", intake_apart=True)
    )
    if not (args.skip_two or args.quick):
        runs.append(
            await b.workers("skewed, 2 workers", f"{topics}-w2", topics, 2, orders, total, "zipf")
        )
        runs.append(  # what a standby copy of every partition costs at full rate
            await b.workers(
                "skewed, 2 workers, 1 standby",
                f"{topics}-w2s",
                topics,
                2,
                orders,
                total,
                "zipf",
                standbys=1,
            )
        )
    restores: dict[str, Any] = {}
    if not args.quick:
        b.say("restore of the default state ...")
        restores["default"] = await restore(f"{topics}-w1", topics, args.partitions, b.tmp)
    hot_topics = f"{b.prefix}-hot"
    hot_total = await b.load(hot_topics, orders, "hot")
    runs.append(await b.workers("hot", f"{hot_topics}-w1", hot_topics, 1, orders, hot_total, "hot"))
    x4_topics = f"{b.prefix}-x4"
    x4_total = await b.load(x4_topics, 4 * orders, "zipf")
    runs.append(
        await b.workers("skewed 4x", f"{x4_topics}-w1", x4_topics, 1, 4 * orders, x4_total, "zipf")
    )
    takeover: list[dict[str, Any]] = []
    rescaled = None
    if not args.quick:
        b.say("rescale of the default state ...")
        rescaled = await rescale_bench(f"{topics}-w1", topics, args.partitions, b.tmp, floor)
        b.say("restore of the 4x state ...")
        restores["4x"] = await restore(f"{x4_topics}-w1", x4_topics, args.partitions, b.tmp)
        from bench.takeover import ENTRIES_PER_BUYER, scenario  # it imports this module

        # A synthetic state the size of the default one, with and without a standby.
        records = restores["default"]["changelog_records_present"]
        entries = records * ENTRIES_PER_BUYER // (ENTRIES_PER_BUYER + 1)
        for standbys in (0, 1):
            b.say(f"takeover, {standbys} standby ...")
            takeover.append(await scenario(standbys, entries, args.partitions, b.stamp))
    lat = None
    if not args.quick:
        half = half_capacity(next(r for r in runs if r["label"] == "skewed")["events_per_s"])
        rate = half if args.latency_rate == HALF else args.latency_rate
        b.say(f"latency at {rate} events/s ...")
        lat = await latency(
            f"{b.prefix}-lat",
            args.partitions,
            rate,
            args.latency_seconds,
            b.tmp,
            args.latency_warmup,
        )
        lat["half_capacity"] = half
        b.say(f"latency p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms")
    result = {
        "machine": machine(),
        "orders": orders,
        "messages": total,
        "partitions": args.partitions,
        "command": "make bench BENCH_ARGS='" + " ".join(sys.argv[1:]) + "'",
        "quick": args.quick,
        "raw_floor_events_per_s": round(floor),
        "pipeline_floor": pipe,
        "runs": runs,
        "restores": restores,
        "takeover": takeover,
        "rescale": rescaled,
        "latency": lat,
        "bench_seconds": round(time.perf_counter() - b.began),
    }
    two = [r for r in runs if r["workers"] == 2]
    if two:
        one = next(r for r in runs if r["label"] == "skewed")
        result["scaling_ratio"] = two[0]["events_per_s"] / one["events_per_s"]
    compare(result)
    save_results(b.stamp, result, markdown(result))
    if not args.keep_topics:
        b.say(f"deleted the run's {await delete_topics(b.stamp)} topics (--keep-topics keeps them)")


if __name__ == "__main__":
    asyncio.run(main())
