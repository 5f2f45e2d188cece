"""The result table writer: coalesced multi-row upserts and deletes, retried until they land."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import countOf
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Insert,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateTable

from coupon_stream.connectors.faults import Backoff, is_deadlock, reason, refusal, retry
from coupon_stream.core.grants import Grant, Granted
from coupon_stream.core.records import MAX_TIMESTAMP_CHARS
from coupon_stream.core.state import ResultRow
from coupon_stream.foundation import metrics
from coupon_stream.foundation.errors import AccessRefused, Fenced, GivenUp
from coupon_stream.foundation.settings import Settings

log = logging.getLogger(__name__)

RowKey = tuple[int, int]  # (buyer_id, effect_time)
CHUNK = 1000
# Rows per executemany of an upsert: the driver folds them into INSERTs of at most its
# max_stmt_length (1 MB) itself, and each call has a fixed cost in Python.
UPSERT_CHUNK = 5000
READ_TIMEOUT = 30.0  # seconds
# Readiness waits this long for the database's answer: a server gone silent would hold a
# health check for the driver's timeouts (a pooled connection's pre-ping, then the query).
PING_TIMEOUT = 2.0
IDLE_TRANSACTION_S = 10  # our transactions never wait between their statements


@dataclass(slots=True)
class WriteResult:
    """What `ResultSink.write` did with a batch.

    `written` False: given up during a rebalance, the caller must not commit. `rejected`:
    the rows the database rejected as data, each alone, with its reason: (key, row or None
    for a delete, reason); every other row of the batch was written.
    """

    written: bool
    rejected: list[tuple[RowKey, ResultRow | None, str]] = field(default_factory=list)


def result_table(name: str, metadata: MetaData | None = None) -> Table:
    """The seed's `tddl_output` (docs/semantics.md, step 4)."""
    return Table(
        name,
        metadata or MetaData(),
        Column("gmt_create", String(MAX_TIMESTAMP_CHARS)),
        Column("gmt_modified", String(MAX_TIMESTAMP_CHARS)),
        Column("buyer_id", BigInteger, nullable=False, autoincrement=False),
        Column("cumulate_amount", BigInteger, nullable=False),
        Column("effect_time", BigInteger, nullable=False, autoincrement=False),
        PrimaryKeyConstraint("buyer_id", "effect_time"),
        mysql_charset="utf8mb4",
    )


def fence_table(result: str, metadata: MetaData | None = None) -> Table:
    """Each app's owner epoch per by-buyer partition, beside the result table it guards.

    The owner of a partition raises its epoch when it claims it (`ResultSink.claim`); every
    write checks, in its own transaction, that the epochs it holds are still the table's
    (docs/design.md, "Fencing").
    """
    return Table(
        f"{result}_fence",
        metadata or MetaData(),
        Column("app_id", String(249), nullable=False),
        Column("partition_id", Integer, nullable=False, autoincrement=False),
        Column("epoch", BigInteger, nullable=False),
        Column("owner", String(255)),
        PrimaryKeyConstraint("app_id", "partition_id"),
        mysql_charset="utf8mb4",
    )


def grants_table(name: str, mysql_ddl: bool, metadata: MetaData | None = None) -> Table:
    """The tier each (buyer, day) reached under the coupon policy (docs/design.md, "Coupon
    grants"): written in the same transaction as the result rows, so the two always agree.

    `updated_at` is when the grant last changed: MySQL moves it only when a value changes.
    """
    now = "CURRENT_TIMESTAMP(3)" if mysql_ddl else "CURRENT_TIMESTAMP"
    return Table(
        name,
        metadata or MetaData(),
        Column("buyer_id", BigInteger, nullable=False, autoincrement=False),
        Column("effect_time", BigInteger, nullable=False, autoincrement=False),
        Column("tier", Integer, nullable=False),
        Column("coupon_amount", BigInteger, nullable=False),
        Column("policy_version", Integer, nullable=False),
        Column(
            "updated_at",
            mysql.DATETIME(fsp=3) if mysql_ddl else DateTime,
            nullable=False,
            server_default=text(f"{now} ON UPDATE {now}" if mysql_ddl else now),
        ),
        PrimaryKeyConstraint("buyer_id", "effect_time"),
        mysql_charset="utf8mb4",
    )


def _engine(url: str, tls: ssl.SSLContext | None) -> AsyncEngine:
    # A statement that hangs (a server gone silent) fails after READ_TIMEOUT and is retried,
    # well before Faust's 60 s rebalance timeout could hand its partitions to another worker.
    connect_args: dict[str, object] = (
        {
            "connect_timeout": 5,
            "read_timeout": READ_TIMEOUT,
            # A worker frozen inside a write (SIGSTOP, a VM paused) holds the fence rows'
            # share locks, and the next owner's claim waits on them: the server ends such a
            # transaction once it has been idle this long, and the claim goes through.
            # MariaDB's setting, in a comment only MariaDB 10.3+ executes: MySQL sets the
            # harmless variable alone.
            "init_command": "SET @coupon_stream = 1 /*M!100300 , SESSION "
            f"idle_transaction_timeout = {IDLE_TRANSACTION_S} */",
        }
        if url.startswith("mysql")
        else {}
    )
    if tls is not None:
        connect_args["ssl"] = tls  # asyncmy: TLS, the certificate and hostname verified
    return create_async_engine(
        url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args
    )


@dataclass(frozen=True, slots=True)
class _DriverSql:
    upsert: str
    table: str
    fences: str
    grants: str
    mark: str  # the driver's placeholder
    mysql: bool

    def delete(self, n: int, table: str) -> str:
        """DELETE of `n` (buyer_id, effect_time) keys from `table` in one statement."""
        keys = ", ".join([f"({self.mark}, {self.mark})"] * n)
        return f"DELETE FROM {table} WHERE (buyer_id, effect_time) IN ({keys})"

    def insert_or_update(
        self, table: str, columns: Sequence[str], values: str, updates: Mapping[str, str | None]
    ) -> str:
        """INSERT of one row, or on a key conflict an UPDATE: `updates` maps a column to its
        new value, an SQL expression or None for the value the INSERT carried."""
        new = "VALUES({})" if self.mysql else "excluded.{}"
        sets = ", ".join(f"{c} = {new.format(c) if v is None else v}" for c, v in updates.items())
        insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"
        if self.mysql:
            return f"{insert} ON DUPLICATE KEY UPDATE {sets}"
        return f"{insert} ON CONFLICT ({', '.join(columns[:2])}) DO UPDATE SET {sets}"

    @property
    def grant_upsert(self) -> str:
        m = self.mark
        updates: dict[str, str | None] = dict.fromkeys(("tier", "coupon_amount", "policy_version"))
        if not self.mysql:  # MySQL moves updated_at itself when a value changes
            updates["updated_at"] = "CURRENT_TIMESTAMP"
        columns = ("buyer_id", "effect_time", "tier", "coupon_amount", "policy_version")
        return self.insert_or_update(self.grants, columns, ", ".join([m] * 5), updates)

    def epochs(self, n: int) -> str:
        """The epochs of `n` partitions of one app, share-locked until the transaction ends:
        a claim (an UPDATE) waits for the write that checked them, or the write sees it."""
        marks = ", ".join([self.mark] * n)
        lock = " LOCK IN SHARE MODE" if self.mysql else ""  # SQLite: one writer at a time
        return (
            f"SELECT partition_id, epoch FROM {self.fences} "
            f"WHERE app_id = {self.mark} AND partition_id IN ({marks}){lock}"
        )

    @property
    def claim(self) -> str:
        m = self.mark
        columns = ("app_id", "partition_id", "epoch", "owner")
        return self.insert_or_update(
            self.fences, columns, f"{m}, {m}, 1, {m}", {"epoch": "epoch + 1", "owner": None}
        )


class ResultSink:
    """Writes the latest state of each (buyer_id, effect_time): a row, or its absence.

    `write` returns only once the database has committed, retrying with backoff for as long
    as it takes: the caller acknowledges its Kafka messages after that, so an offset is never
    committed ahead of the table.
    """

    def __init__(
        self,
        url: str,
        table_name: str,
        safe_url: str = "",
        tls: ssl.SSLContext | None = None,
        app_id: str = "coupon-stream",
        grants: str | None = None,
    ) -> None:
        self._url = url
        self._safe_url = safe_url or "<database>"
        self._user = make_url(url).username or "<none>"
        self._tls = tls
        self.app_id = app_id
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.table = result_table(table_name)
        self.fences = fence_table(table_name)
        self.grants = grants_table(grants, url.startswith("mysql")) if grants else None
        self._engine: AsyncEngine | None = None
        self._upsert = self._make_upsert(url)(self.table)
        self._sql: _DriverSql | None = None
        self.available = False
        self.last_error: str | None = None  # of the current outage, for the stall report
        self.max_backoff = 2.0
        self._pinging: asyncio.Future[bool] | None = None

    @staticmethod
    def _make_upsert(url: str) -> Callable[[Table], Insert]:
        if url.startswith("mysql"):

            def build(table: Table) -> Insert:
                stmt = mysql.insert(table)
                return stmt.on_duplicate_key_update(
                    gmt_create=stmt.inserted.gmt_create,
                    gmt_modified=stmt.inserted.gmt_modified,
                    cumulate_amount=stmt.inserted.cumulate_amount,
                )

        elif url.startswith("sqlite"):

            def build(table: Table) -> Insert:
                stmt = sqlite.insert(table)
                return stmt.on_conflict_do_update(
                    index_elements=["buyer_id", "effect_time"],
                    set_={
                        "gmt_create": stmt.excluded.gmt_create,
                        "gmt_modified": stmt.excluded.gmt_modified,
                        "cumulate_amount": stmt.excluded.cumulate_amount,
                    },
                )

        else:
            raise ValueError("COUPON_DB_URL must be a mysql+asyncmy:// or sqlite+aiosqlite:// URL")
        return build

    @classmethod
    def of(cls, settings: Settings) -> ResultSink:
        """The sink the settings describe: URL, table and TLS."""
        return cls(
            settings.db_url.get_secret_value(),
            settings.result_table,
            settings.db_url_safe,
            settings.db_tls(),
            settings.app_id,
            settings.grants_table if settings.policy is not None else None,
        )

    def _refused(self, exc: BaseException) -> AccessRefused | None:
        what = refusal(exc)
        if what is None:
            return None
        return AccessRefused(f"database {self._safe_url} refused user {self._user}: {what}")

    async def check_access(self, timeout: float = 15.0) -> None:
        """Connect once: raise AccessRefused if the database refuses the service's account.

        A database that does not answer is left to the writes' retries.
        """
        engine = _engine(self._url, self._tls)
        try:
            async with asyncio.timeout(timeout), engine.connect() as conn:
                await conn.execute(select(1))
        except Exception as exc:  # noqa: BLE001 - a refusal raises below, the rest is an outage
            refused = self._refused(exc)
            if refused is not None:
                raise refused from None
            log.warning("database %s did not answer: %s", self._safe_url, reason(exc))
        finally:
            await engine.dispose()

    async def start(self) -> None:
        self._engine = _engine(self._url, self._tls)
        try:
            await self._retry("create table", self._create_table)
        except _Permanent as failed:
            raise failed.error from None

    async def stop(self) -> None:
        if self._pinging is not None:
            self._pinging.cancel()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def _create_table(self) -> None:
        assert self._engine is not None
        async with self._engine.begin() as conn:
            await conn.run_sync(self._create_if_missing)

    def _create_if_missing(self, conn: Connection) -> None:
        # Checked first, since MySQL warns on every CREATE of a table that exists; IF NOT
        # EXISTS still, since workers that start together race between check and create.
        for table in (self.table, self.fences, self.grants):
            if table is not None and not inspect(conn).has_table(table.name):
                conn.execute(CreateTable(table, if_not_exists=True))

    async def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        """True if the database answers within `timeout` (for readiness).

        A ping that has not answered yet goes on in the background (bounded by the driver's
        timeouts) and the next call waits for it rather than start another: cancelling it
        mid-read would leave a pooled connection in an unknown state.
        """
        if self._engine is None:
            return False
        if self._pinging is None or self._pinging.done():
            self._pinging = asyncio.ensure_future(self._ping_once(self._engine))
        try:
            return await asyncio.wait_for(asyncio.shield(self._pinging), timeout)
        except TimeoutError:
            self.available = False
            return False

    async def _ping_once(self, engine: AsyncEngine) -> bool:
        try:
            async with engine.connect() as conn:
                await conn.execute(select(1))
        except (SQLAlchemyError, OSError):
            self.available = False
            return False
        return True

    async def write(
        self,
        rows: Mapping[RowKey, ResultRow | None],
        still_wanted: Callable[[], bool] | None = None,
        epochs: Mapping[int, int] | None = None,
        grants: Mapping[RowKey, Grant] | None = None,
    ) -> WriteResult:
        """Upsert the rows that are present, delete the keys mapped to None, in one commit.

        `grants`: the grants table's changes, in the same transaction (a tier of 0 deletes
        the key's grant); a key's grant goes with its row, rejected with it.

        `epochs`: the by-buyer partitions the rows come from, each with the epoch this worker
        claimed it with (`claim`). The same transaction checks them first and raises
        `Fenced`, writing nothing, if a newer owner has claimed one since.

        Returns `written=False` if `still_wanted()` turns false between two attempts (the
        database is down during a rebalance); nothing is written then, unless the batch was
        already split around a rejected row (below), whose committed parts hold the keys'
        current values, as the next owner's replay does.

        A row the database rejects as data (a permanent error: out of range, too long, a
        constraint) would fail the batch forever: the batch is split in halves, each its own
        transaction, down to the rejected row, which alone is set aside (logged, counted,
        returned in `rejected`) while every other row is written.
        """
        if not rows:
            return WriteResult(True)
        result = WriteResult(True)
        started = time.perf_counter()
        fence = dict(epochs or {})
        items = list(rows.items())
        if not await self._write_split(items, result.rejected, still_wanted, fence, grants or {}):
            metrics.SINK_ABANDONED.inc(len(rows))
            result.written = False
            return result
        metrics.SINK_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.SINK_BATCH_ROWS.observe(len(rows))
        deleted = countOf(rows.values(), None)  # one pass in C, not two in Python
        upserted = len(rows) - deleted
        for _, row, _ in result.rejected:
            if row is None:
                deleted -= 1
            else:
                upserted -= 1
        metrics.ROWS_UPSERTED.inc(upserted)
        metrics.ROWS_DELETED.inc(deleted)
        return result

    async def _write_split(
        self,
        items: list[tuple[RowKey, ResultRow | None]],
        rejected: list[tuple[RowKey, ResultRow | None, str]],
        wanted: Callable[[], bool] | None,
        epochs: dict[int, int],
        grants: Mapping[RowKey, Grant],
    ) -> bool:
        """Write `items` in one transaction, or in halves around rows rejected as data."""
        upserts = [r for _, r in items if r is not None]
        deletes = [k for k, r in items if r is None]
        mine = [grants[k] for k, _ in items if k in grants] if grants else []
        try:
            return await self._retry(
                "write", self._write_once, upserts, deletes, epochs, mine, wanted=wanted
            )
        except _Permanent as failed:
            if len(items) > 1:
                half = len(items) // 2
                return await self._write_split(
                    items[:half], rejected, wanted, epochs, grants
                ) and await self._write_split(items[half:], rejected, wanted, epochs, grants)
            ((key, row),) = items
            why = reason(failed.error)
            metrics.SINK_REJECTED.inc()
            log.error(
                "database %s rejected the row of buyer_id=%d effect_time=%d (%s): %s; the row is "
                "set aside and the rest of its batch written",
                self._safe_url,
                key[0],
                key[1],
                "delete" if row is None else f"cumulate_amount={row.cumulate_amount}",
                why,
            )
            rejected.append((key, row, why))
            return True

    async def _write_once(
        self,
        upserts: list[ResultRow],
        deletes: Sequence[RowKey],
        epochs: dict[int, int],
        grants: Sequence[Grant],
    ) -> None:
        assert self._engine is not None
        async with self._engine.begin() as conn:
            sql = self._sql or self._driver_sql(conn.dialect)
            if epochs:
                found = await conn.exec_driver_sql(sql.epochs(len(epochs)), (self.app_id, *epochs))
                rows: list[Any] = list(found.all())
                now = {int(p): int(e) for p, e in rows}
                for partition, epoch in epochs.items():
                    if now.get(partition) != epoch:
                        raise Fenced(partition, "its result rows", now.get(partition))
            await _upsert_and_delete(conn, sql, sql.upsert, upserts, sql.table, deletes)
            if grants:
                held = [
                    (g.buyer_id, g.effect_time, g.tier, g.coupon_amount, g.policy_version)
                    for g in grants
                    if g.tier
                ]
                gone = [(g.buyer_id, g.effect_time) for g in grants if not g.tier]
                await _upsert_and_delete(conn, sql, sql.grant_upsert, held, sql.grants, gone)

    def _driver_sql(self, dialect: Dialect) -> _DriverSql:
        """The statements as the driver's own SQL, compiled once.

        Executed with plain tuples, they skip SQLAlchemy's per-row parameter processing,
        which was most of the sink's CPU; the driver (asyncmy) folds an executemany of the
        upsert into multi-row INSERTs itself.
        """
        compiled = self._upsert.compile(dialect=dialect)
        if tuple(compiled.positiontup or ()) != ResultRow._fields:
            raise RuntimeError(f"upsert parameters {compiled.positiontup} are not ResultRow's")
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        quote = dialect.identifier_preparer.format_table
        self._sql = _DriverSql(
            str(compiled),
            quote(self.table),
            quote(self.fences),
            quote(self.grants) if self.grants is not None else "",
            mark,
            dialect.name != "sqlite",
        )
        return self._sql

    async def epoch(self, partition: int) -> int | None:
        """This app's epoch of `partition` now, or None (none yet, or the database failing):
        for the log line of a checkpoint another store fenced."""
        if self._engine is None:
            return None
        try:
            async with self._engine.connect() as conn:
                sql = self._sql or self._driver_sql(conn.dialect)
                found = await conn.exec_driver_sql(sql.epochs(1), (self.app_id, partition))
                row: Any = found.first()
        except (SQLAlchemyError, OSError):
            return None
        return None if row is None else int(row[1])

    async def claim(self, partition: int) -> int:
        """Raise this app's epoch of `partition` and return it (the fence's token).

        From then on a write that holds an older epoch of the partition is refused
        (`write`), whichever worker sends it. Waits for a write that checked the old epoch
        to commit first (its share lock), so every write lands before or is refused.
        """
        epoch = 0

        async def claim_once() -> None:
            nonlocal epoch
            assert self._engine is not None
            async with self._engine.begin() as conn:
                sql = self._sql or self._driver_sql(conn.dialect)
                await conn.exec_driver_sql(sql.claim, (self.app_id, partition, self.owner))
                found = await conn.exec_driver_sql(sql.epochs(1), (self.app_id, partition))
                row: Any = found.one()
                epoch = int(row[1])

        if self._engine is None:
            await self.start()
        try:
            await self._retry("claim", claim_once)
        except _Permanent as failed:
            raise failed.error from None
        return epoch

    async def _retry(
        self,
        what: str,
        fn: Callable[..., Awaitable[None]],
        *args: object,
        wanted: Callable[[], bool] | None = None,
    ) -> bool:
        """Run `fn` until it works (True), or until `wanted()` is false before a retry.

        Transient errors (see `coupon_stream.connectors.faults`) are retried with backoff; a
        permanent one raises `_Permanent` at once: running the same statement again cannot help.
        """
        failures = 0
        down = False

        async def attempt() -> None:
            if what == "write" and failures and failures % 5 == 0:
                # The table may have been dropped under us; recreating it is harmless.
                try:
                    await self._create_table()
                except (SQLAlchemyError, OSError):
                    pass
            await fn(*args)

        def failed(exc: BaseException, delay: float) -> None:
            nonlocal failures, down
            failures += 1
            metrics.SINK_RETRIES.inc()
            if is_deadlock(exc):
                log.warning(
                    "database %s: a %s deadlocked with another worker's and was rolled back; "
                    "running it again",
                    self._safe_url,
                    what,
                )
                return
            if not down:
                down = True
                log.error(
                    "database %s failed, retrying with backoff until it works: %s: %s",
                    self._safe_url,
                    type(exc).__name__,
                    reason(exc)[:300],
                )
            self.available = False
            self.last_error = f"database {self._safe_url}: {reason(exc)[:300]}"
            metrics.SINK_AVAILABLE.set(0)

        try:
            await retry(
                attempt, backoff=Backoff(0.1, self.max_backoff), wanted=wanted, failed=failed
            )
        except GivenUp as given_up:
            # Given up after the attempt that failed last, which `failed` was not told of.
            last = given_up.__cause__
            log.warning(
                "database %s: gave up a %s after %d failed attempts (the last: %s), it is no "
                "longer wanted",
                self._safe_url,
                what,
                failures + 1,
                reason(last)[:300] if last is not None else "?",
            )
            return False
        except (SQLAlchemyError, OSError) as exc:
            refused = self._refused(exc)
            if refused is not None:
                raise refused from None  # the account, not the data: stop the worker
            # The database answered, so it is up; its "no" is about the data.
            self._up(down, failures)
            raise _Permanent(exc) from exc
        self._up(down, failures)
        return True

    def _up(self, was_down: bool, failures: int) -> None:
        if was_down:
            log.warning("database %s is back after %d failed attempts", self._safe_url, failures)
        self.available = True
        metrics.SINK_AVAILABLE.set(1)

    async def fetch_all(self) -> list[tuple[Any, ...]]:
        """All rows, ordered by key (for `coupon-stream show` and tests)."""
        assert self._engine is not None
        t = self.table
        async with self._engine.connect() as conn:
            result = await conn.execute(
                select(
                    t.c.gmt_create,
                    t.c.gmt_modified,
                    t.c.buyer_id,
                    t.c.cumulate_amount,
                    t.c.effect_time,
                ).order_by(t.c.buyer_id, t.c.effect_time)
            )
            return [tuple(r) for r in result]

    async def totals_and_grants(
        self, buyer: int | None = None, day: int | None = None
    ) -> tuple[dict[RowKey, int], dict[RowKey, Granted]]:
        """Day totals and the grants table (of one buyer, or one day of it), read in one
        transaction: for `coupon-stream grants`."""
        assert self._engine is not None and self.grants is not None
        t, g = self.table, self.grants
        async with self._engine.begin() as conn:
            q = select(t.c.buyer_id, t.c.effect_time, t.c.cumulate_amount)
            r = select(
                g.c.buyer_id, g.c.effect_time, g.c.tier, g.c.coupon_amount, g.c.policy_version
            )
            if buyer is not None:
                q, r = q.where(t.c.buyer_id == buyer), r.where(g.c.buyer_id == buyer)
            if day is not None:
                q, r = q.where(t.c.effect_time == day), r.where(g.c.effect_time == day)
            totals = {(b, d): a for b, d, a in await conn.execute(q)}
            granted = {(b, d): (ti, a, v) for b, d, ti, a, v in await conn.execute(r)}
        return totals, granted

    async def write_reconciled(self, grants: Sequence[Grant]) -> int:
        """Rows of the grants table a reconcile changes, in one transaction; a row a worker
        wrote meanwhile under the same policy or a newer one is left as it is. Returns the
        rows changed."""
        assert self._engine is not None and self.grants is not None
        g = self.grants
        changed = 0
        async with self._engine.begin() as conn:
            for grant in grants:
                key = (g.c.buyer_id == grant.buyer_id) & (g.c.effect_time == grant.effect_time)
                older = g.c.policy_version < grant.policy_version
                if grant.tier:
                    values = {
                        "tier": grant.tier,
                        "coupon_amount": grant.coupon_amount,
                        "policy_version": grant.policy_version,
                    }
                    done = await conn.execute(g.update().where(key & older).values(**values))
                    if not done.rowcount:
                        exists = await conn.execute(select(g.c.tier).where(key))
                        if exists.first() is None:
                            await conn.execute(
                                g.insert().values(
                                    buyer_id=grant.buyer_id, effect_time=grant.effect_time, **values
                                )
                            )
                            changed += 1
                    changed += done.rowcount
                else:
                    done = await conn.execute(g.delete().where(key & older))
                    changed += done.rowcount
        return changed


async def _upsert_and_delete(
    conn: AsyncConnection,
    sql: _DriverSql,
    upsert: str,
    rows: Sequence[Sequence[Any]],
    table: str,
    keys: Sequence[RowKey],
) -> None:
    """`rows` through `upsert`, UPSERT_CHUNK per call, then `keys` deleted from `table`,
    CHUNK per statement."""
    for i in range(0, len(rows), UPSERT_CHUNK):
        await conn.exec_driver_sql(upsert, rows[i : i + UPSERT_CHUNK])
        metrics.SINK_STATEMENTS.inc()
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        params = tuple(v for key in chunk for v in key)
        await conn.exec_driver_sql(sql.delete(len(chunk), table), params)
        metrics.SINK_STATEMENTS.inc()


class _Permanent(Exception):
    """A statement the database refused for good (a permanent error), carrying it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
