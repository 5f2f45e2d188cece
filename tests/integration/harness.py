"""Drives real worker processes against the real Kafka and MariaDB started by `make up`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.protocol.group import MemberAssignment, ProtocolMetadata
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from coupon_stream.connectors import clients
from coupon_stream.connectors.engine import topic_partitions
from coupon_stream.connectors.kafka import PartitionReader
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools import status
from coupon_stream.tools.rescale import state_committed
from tests.reference import policy_applied

# Every integration test runs with a coupon policy: its grants are checked where its table is.
TEST_TIERS = "100:10,300:30,1000:100"
BOOTSTRAP = os.environ.get("COUPON_TEST_BOOTSTRAP", "127.0.0.1:9092")
MYSQL_URL = os.environ.get(
    "COUPON_TEST_DB_URL", "mysql+asyncmy://coupons:coupons@127.0.0.1:3306/coupons"
)
WORKER = [str(Path(sys.executable).with_name("coupon-stream")), "worker"]
INTAKE = [str(Path(sys.executable).with_name("coupon-stream")), "intake"]
REPO = Path(__file__).resolve().parents[2]


def unavailable(reason: str) -> None:
    """A service a test needs is missing: a failure under CI=true (`make test` starts every
    one), a skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: `make test` must start it)")
    pytest.skip(reason)


def record(test: str, **fields: object) -> None:
    """Append a measurement to .local/reliability.jsonl (docs/reliability.md cites them)."""
    path = REPO / ".local" / "reliability.jsonl"
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"test": test, "at": time.strftime("%Y-%m-%d %H:%M:%S"), **fields}))
        f.write("\n")


def service(script: str, action: str) -> None:
    """Stop/start/restart the local Kafka or MariaDB with the project's own scripts."""
    subprocess.run(["bash", str(REPO / "scripts" / script), action], check=True, timeout=180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SESSION_TIMEOUT = 10.0  # COUPON_SESSION_TIMEOUT's default


async def until(
    condition: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str | Callable[[], str],
    every: float = 0.25,
) -> float:
    """Poll `condition` until it holds; the seconds it took. Past `timeout` the test fails
    with `what` (a callable is asked only then: a worker's log tail, say)."""
    began = time.monotonic()
    while not await condition():
        if time.monotonic() - began >= timeout:
            raise AssertionError(
                f"not within {timeout:.0f} s: " + (what if isinstance(what, str) else what())
            )
        await asyncio.sleep(every)
    return time.monotonic() - began


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    # SIGSTOPped by `Pipeline.freeze`: alive (poll() is None) but silent, and deaf to any
    # signal but SIGKILL until `thaw`. Its web port accepts connections and never answers.
    frozen: bool = False

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "<no log>"

    def lines(self, pattern: re.Pattern[str]) -> list[str]:
        """The lines of the worker's log that `pattern` matches (searched anywhere in a line)."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if pattern.search(line)]


@dataclass(frozen=True)
class Member:
    """A member of a consumer group, as the group coordinator describes it."""

    member_id: str
    url: str  # Faust's canonical URL (http://host:web port): which worker it is; "" if none
    assignment: dict[str, list[int]]  # topic -> partitions (empty while rebalancing)

    def is_worker(self, worker: Worker) -> bool:
        return self.url.endswith(f":{worker.port}")


@dataclass
class Pipeline:
    """One isolated deployment: its own topics, consumer group and result table."""

    tmp: Path
    partitions: int = 6
    name: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    workers: list[Worker] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    bootstrap: str = BOOTSTRAP
    db_url: str = MYSQL_URL
    # How the test itself reaches Kafka and the database (COUPON_* security settings): on a
    # secured cluster, as an administrator, whatever the workers are allowed.
    admin_env: dict[str, str] = field(default_factory=dict)
    # Input and dead-letter topics start with the app id unless told otherwise; on a
    # secured cluster they must not, or the app id's prefixed ACL would cover them.
    topic_prefix: str = ""
    # The workers' COUPON_APP_ID, when not `name` (another app on the same input and table).
    app_id: str = ""

    @property
    def app(self) -> str:
        return self.app_id or self.name

    @property
    def orders_topic(self) -> str:
        return f"{self.topic_prefix}{self.name}-orders"

    @property
    def refunds_topic(self) -> str:
        return f"{self.topic_prefix}{self.name}-refunds"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}{self.name}-dlq"

    @property
    def table(self) -> str:
        return f"out_{self.name}"

    @property
    def by_buyer_topic(self) -> str:
        return f"{self.app}-payments-by-buyer"

    @property
    def grants_table(self) -> str:
        return f"grants_{self.name}"

    def env(self, index: int, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            COUPON_BROKER=f"kafka://{self.bootstrap}",
            COUPON_DB_URL=self.db_url,
            COUPON_APP_ID=self.app,
            COUPON_ORDERS_TOPIC=self.orders_topic,
            COUPON_REFUNDS_TOPIC=self.refunds_topic,
            COUPON_DLQ_TOPIC=self.dlq_topic,
            COUPON_RESULT_TABLE=self.table,
            COUPON_PARTITIONS=str(self.partitions),
            COUPON_DATA_DIR=str(self.tmp / f"worker{index}"),
            COUPON_WEB_PORT=str(port),
            COUPON_GRANT_TIERS=TEST_TIERS,
            COUPON_GRANT_POLICY_VERSION="1",
            COUPON_GRANTS_TABLE=self.grants_table,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    # -- topics ----------------------------------------------------------------------------

    async def create_topics(self, orders: int = 3, refunds: int = 2) -> None:
        admin = clients.admin(self.admin)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(self.orders_topic, orders, 1),
                    NewTopic(self.refunds_topic, refunds, 1),
                ]
            )
        finally:
            await admin.close()

    def messages(self, data: Any) -> list[tuple[str, int | None, bytes]]:
        """A generated dataset's orders then refunds, as messages to `produce`."""
        out: list[tuple[str, int | None, bytes]]
        out = [(self.orders_topic, None, orjson.dumps(o)) for o in data.orders]
        return out + [(self.refunds_topic, None, orjson.dumps(r)) for r in data.refunds]

    async def produce(self, messages: Sequence[tuple[str, int | None, bytes]]) -> None:
        """Send (topic, partition or None, value) in order; wait for every ack."""
        producer = clients.producer(self.admin, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(t, value=v, partition=p) for t, p, v in messages]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    # -- workers ---------------------------------------------------------------------------

    def start_worker(self, index: int | None = None, env: dict[str, str] | None = None) -> Worker:
        """A worker process; `env` overrides this one's settings (e.g. its COUPON_BROKER)."""
        index = len(self.workers) if index is None else index
        args = ["--loglevel", "info", "--web-port"]
        return self._spawn("worker", index, env, lambda port: [*WORKER, *args, str(port)])

    def start_intake(self, index: int, env: dict[str, str] | None = None) -> Worker:
        """A `coupon-stream intake` process (for workers started with COUPON_INTAKE=false);
        one of `workers`, so that it is stopped with them."""
        return self._spawn("intake", index, env, lambda port: INTAKE)

    def _spawn(
        self,
        kind: str,
        index: int,
        env: dict[str, str] | None,
        command: Callable[[int], list[str]],
    ) -> Worker:
        """`command(port)` on a free web port (COUPON_WEB_PORT), with this pipeline's settings
        and `env` over them, logging to `<kind><index>-<n>.log`."""
        port = free_port()
        log = self.tmp / f"{kind}{index}-{len(self.workers)}.log"
        proc = subprocess.Popen(
            command(port),
            env=self.env(index, port) | (env or {}),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = Worker(proc, log, port)
        self.workers.append(process)
        return process

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> None:
        if worker.proc.poll() is None:
            os.killpg(worker.proc.pid, sig)
            if worker.frozen:  # a stopped process handles no signal until it runs again
                self.thaw(worker)
            try:
                worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()

    def stop_all(self) -> None:
        for w in self.workers:
            self.kill(w, signal.SIGTERM)

    def freeze(self, worker: Worker) -> None:
        """SIGSTOP the worker's process group: no heartbeat, no I/O, state kept (a long GC
        pause, a stalled VM); the group drops it after COUPON_SESSION_TIMEOUT."""
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        worker.frozen = True

    def thaw(self, worker: Worker) -> None:
        """SIGCONT a frozen worker: it goes on from the instruction where it stopped."""
        os.killpg(worker.proc.pid, signal.SIGCONT)
        worker.frozen = False

    def assert_workers_alive(self) -> None:
        # A frozen worker counts as alive: Popen.poll() reports only an exit, not a stop.
        for w in self.workers:
            if w.proc.poll() is not None and w.proc.returncode not in (-9, -15, 0):
                raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.tail()}")

    # -- observation -----------------------------------------------------------------------

    async def group_members(self, group: str | None = None) -> list[Member]:
        """The members of a consumer group (default: the state group, `<app>`), described
        by its coordinator as `tools/rescale.py` does; the intake group's have no url."""
        admin = clients.admin(self.admin)
        await admin.start()
        try:
            # One group a request: aiokafka misreads a response describing several.
            (described,) = await admin.describe_consumer_groups([group or self.app])
        finally:
            await admin.close()
        members = []
        for *_, described_members in described.groups:
            for member_id, _client, _host, metadata, assignment in described_members:
                try:
                    url = str(orjson.loads(ProtocolMetadata.decode(metadata).user_data)["url"])
                except (ValueError, KeyError, TypeError):
                    url = ""  # not a Faust member
                topics = MemberAssignment.decode(assignment).assignment if assignment else []
                members.append(Member(member_id, url, {t: sorted(ps) for t, ps in topics}))
        return members

    async def lag(self) -> dict[TopicPartition, int]:
        """Messages not yet committed by the service's consumer groups, per partition."""
        return (await status.lag(self.admin))[0]

    @property
    def settings(self) -> Settings:
        """The Settings a worker of this pipeline reads from its environment."""
        env = self.env(0, 0)
        values: dict[str, Any] = {
            k[7:].lower(): v for k, v in env.items() if k.startswith("COUPON_")
        }
        return Settings(**values)

    @property
    def admin(self) -> Settings:
        """The worker's Settings with the test's own credentials (`admin_env`)."""
        env = {k: v for k, v in self.env(0, 0).items() if not k.startswith("COUPON_KAFKA_")}
        env = {k: v for k, v in env.items() if not k.startswith("COUPON_DB_")}
        env |= {"COUPON_BROKER": self.bootstrap, "COUPON_DB_URL": self.db_url, **self.admin_env}
        values: dict[str, Any] = {
            k[7:].lower(): v for k, v in env.items() if k.startswith("COUPON_")
        }
        return Settings(**values)

    def _engine(self):  # noqa: ANN202
        tls = self.admin.db_tls()
        return create_async_engine(self.db_url, connect_args={"ssl": tls} if tls else {})

    async def wait_quiescent(self, timeout: float = 240.0) -> None:
        """Until every input and by-buyer partition is fully committed, twice in a row.

        The state agent acknowledges a message only after its rows are committed to MySQL,
        so zero lag everywhere means the table reflects all input produced so far.
        """
        deadline = time.monotonic() + timeout
        zero_streak = 0
        last: dict[TopicPartition, int] = {}
        while time.monotonic() < deadline:
            self.assert_workers_alive()
            last = await self.lag()
            by_buyer = [tp for tp in last if tp.topic == self.by_buyer_topic]
            if by_buyer and all(v == 0 for v in last.values()):
                zero_streak += 1
                if zero_streak >= 2:
                    return
            else:
                zero_streak = 0
            await asyncio.sleep(1.0)
        tails = "\n\n".join(w.tail() for w in self.workers)
        raise AssertionError(f"not quiescent after {timeout}s; lag {last}\n{tails}")

    async def table_rows(self) -> set[tuple[Any, ...]]:
        """The result table; and, read in the same transaction, the grants table must be the
        coupon policy applied to it (they are written together), whenever it is read."""
        engine = self._engine()
        try:
            async with engine.begin() as conn:
                result = await conn.execute(
                    text(
                        "SELECT gmt_create, gmt_modified, buyer_id, cumulate_amount, effect_time"
                        f" FROM `{self.table}`"
                    )
                )
                rows = {tuple(r) for r in result}
                granted = await self._granted(conn)
        finally:
            await engine.dispose()
        policy = self.admin.policy
        if policy is not None and granted is not None:
            assert granted == policy_applied(policy, rows), "grants table != policy(table)"
        return rows

    async def _granted(self, conn: Any) -> dict[tuple[int, int], tuple[int, int, int]] | None:
        try:
            result = await conn.execute(
                text(
                    "SELECT buyer_id, effect_time, tier, coupon_amount, policy_version"
                    f" FROM `{self.grants_table}`"
                )
            )
        except Exception as exc:  # noqa: BLE001 - not created yet: no worker started
            if "doesn't exist" in str(exc):
                return None
            raise
        return {(b, d): (t, a, v) for b, d, t, a, v in result}

    async def grants(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        engine = self._engine()
        try:
            async with engine.connect() as conn:
                return await self._granted(conn) or {}
        finally:
            await engine.dispose()

    async def grant_events(self, apps: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Every committed event of the apps' grants topics (this pipeline's app's)."""
        topics = [f"{app}-grants" for app in (apps or [self.app])]
        return [orjson.loads(r.value) for r in await self.read_topics(topics)]

    async def assert_grants_agree(self, apps: Sequence[str] = ()) -> None:
        """The grants topic as a consumer keeps it (per key, the highest version) is the
        grants table, at a quiescent point; one id always says one state."""
        by_id: dict[str, tuple[Any, ...]] = {}
        best: dict[tuple[int, int], dict[str, Any]] = {}
        for e in await self.grant_events(apps):
            state = (e["buyer_id"], e["effect_time"], e["tier"], e["coupon_amount"])
            assert by_id.setdefault(e["id"], state) == state, f"event {e['id']}: two states"
            key = (e["buyer_id"], e["effect_time"])
            if key not in best or e["version"] > best[key]["version"]:
                best[key] = e
        reduced = {
            k: (e["tier"], e["coupon_amount"], e["policy_version"])
            for k, e in best.items()
            if e["tier"]
        }
        granted = await self.grants()
        assert reduced == granted, f"events reduced {len(reduced)} != grants table {len(granted)}"

    async def drop_table(self) -> None:
        engine = self._engine()
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f"DROP TABLE IF EXISTS `{self.table}`"))
                await conn.execute(text(f"DROP TABLE IF EXISTS `{self.table}_fence`"))
                await conn.execute(text(f"DROP TABLE IF EXISTS `{self.grants_table}`"))
        finally:
            await engine.dispose()

    async def dead_letters(self) -> list[tuple[bytes | None, dict[str, bytes]]]:
        return [(r.value, dict(r.headers)) for r in await self.read_topics([self.dlq_topic])]

    async def partition_count(self, topic: str) -> int:
        """The topic's partitions; 0 if it does not exist (asked without naming it, so that
        asking creates nothing)."""
        consumer = clients.consumer(self.admin, enable_auto_commit=False)
        await consumer.start()
        try:
            return len((await topic_partitions(consumer, [topic]))[topic])
        finally:
            await consumer.stop()

    async def read_topics(self, topics: Sequence[str]) -> list[Any]:
        """Every committed record of `topics`, from their beginning to their end now."""
        consumer = clients.consumer(
            self.admin,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            found = await topic_partitions(consumer, list(topics))
            tps = [TopicPartition(t, p) for t in topics for p in sorted(found.get(t, ()))]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out = []
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    out += records
            return out
        finally:
            await consumer.stop()

    async def http_get(self, worker: Worker, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def wait_for_progress(self, timeout: float = 120.0) -> float:
        """Until the group's lag has shrunk (the workers are busy); returns seconds waited.

        No lag at all is progress too: the workers already committed all that was produced
        (a worker can drain a test's slice while it is still being sent).
        """
        began = time.monotonic()
        start = sum((await self.lag()).values())
        if not start:
            return 0.0
        deadline = began + timeout
        while time.monotonic() < deadline:
            self.assert_workers_alive()
            if sum((await self.lag()).values()) < start:
                return time.monotonic() - began
            await asyncio.sleep(0.5)
        raise AssertionError("no progress:\n" + "\n\n".join(w.tail() for w in self.workers))

    async def by_buyer_committed(self) -> dict[int, int]:
        """The state group's committed offset per by-buyer partition, from the broker."""
        return await state_committed(self.admin)

    async def wait_every_partition_moves(self, timeout: float = 120.0) -> float:
        """Until every by-buyer partition with lag now has committed past where it is now
        (each partition processed again, whoever owns it); seconds waited."""
        began = time.monotonic()
        lag = await self.lag()
        behind = {tp.partition for tp, n in lag.items() if tp.topic == self.by_buyer_topic and n}
        start = await self.by_buyer_committed()
        while time.monotonic() < began + timeout:
            self.assert_workers_alive()
            now = await self.by_buyer_committed()
            if all(now.get(q, -1) > start.get(q, -1) for q in behind):
                return time.monotonic() - began
            await asyncio.sleep(0.25)
        raise AssertionError(f"partitions {sorted(behind)} not all processed again")

    async def wait_ready(self, worker: Worker, timeout: float = 120.0) -> float:
        """Until /health/ready answers 200 (tables recovered, database up); seconds taken."""

        async def ready() -> bool:
            self.assert_workers_alive()
            try:
                return (await self.http_get(worker, "/health/ready"))[0] == 200
            except OSError:
                return False

        return await until(ready, timeout, lambda: "worker never ready:\n" + worker.tail(), 0.2)

    async def changelog_size(self) -> int:
        """Records in the state tables' changelog topics, read committed (end offsets would
        count each transaction's marker too)."""
        s = self.admin
        reader = PartitionReader(s)
        total = 0
        try:
            for topic in s.changelog_topics.values():
                ends = await reader.end_offsets(topic, range(s.partitions))
                ranges = {p: (0, end) for p, end in ends.items()}
                async for _, records, _ in reader.batches(topic, ranges):
                    total += len(records)
        finally:
            await reader.stop()
        return total

    async def metric(self, worker: Worker, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples on one worker's /metrics, matching `labels`."""
        _, body = await self.http_get(worker, "/metrics")
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sample, value = line.rsplit(" ", 1)
                if all(w in sample for w in wanted):
                    total += float(value)
        return total
