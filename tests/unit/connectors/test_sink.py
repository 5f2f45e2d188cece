"""The result sink's driver-level statements, run against SQLite (the MariaDB path is in
tests/integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError

from coupon_stream.connectors import mysql
from coupon_stream.connectors.mysql import ResultSink, WriteResult
from coupon_stream.core.grants import Grant
from coupon_stream.core.state import ResultRow
from tests.unit.samples import sample


@pytest.mark.asyncio
async def test_upserts_overwrite_and_deletes_remove(tmp_path: Path) -> None:
    sink = ResultSink(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "result")
    await sink.start()
    try:
        first = {(b, 20261111): ResultRow("c", "m", b, b * 10, 20261111) for b in range(1, 2500)}
        assert await sink.write(first) == WriteResult(True, [])
        await sink.write(
            {
                (1, 20261111): ResultRow("c2", None, 1, 7, 20261111),
                **{(b, 20261111): None for b in range(2, 2400)},  # more than one chunk
                (9, 20261112): None,  # a key never written
            }
        )
        rows = await sink.fetch_all()
    finally:
        await sink.stop()
    assert rows == [("c2", None, 1, 7, 20261111)] + [
        ("c", "m", b, b * 10, 20261111) for b in range(2400, 2500)
    ]


@pytest.mark.asyncio
async def test_a_failing_write_no_longer_wanted_is_given_up(tmp_path: Path) -> None:
    sink = ResultSink(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "result")
    await sink.start()
    attempts = 0

    async def down(upserts: object, deletes: object, epochs: object, grants: object) -> None:
        nonlocal attempts
        attempts += 1
        raise OSError("database down")

    sink._write_once = down  # type: ignore[method-assign]
    try:
        row = {(1, 20261111): ResultRow("c", "m", 1, 10, 20261111)}
        wanted = iter([True, False])
        result = await asyncio.wait_for(sink.write(row, still_wanted=lambda: next(wanted)), 10)
        assert not result.written
        assert attempts == 2  # the first attempt, one retry, then it was no longer wanted
        assert await sink.fetch_all() == []
    finally:
        await sink.stop()


@pytest.mark.asyncio
async def test_a_deadlock_is_run_again_without_calling_the_database_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers' upserts can deadlock on InnoDB gap locks: a conflict, not an outage."""
    sink = ResultSink(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "result")
    await sink.start()
    real_write = sink._write_once
    deadlocks = 1

    async def deadlock_once(
        upserts: list[ResultRow],
        deletes: Sequence[tuple[int, int]],
        epochs: dict[int, int],
        grants: Sequence[Grant],
    ) -> None:
        nonlocal deadlocks
        if deadlocks:
            deadlocks -= 1
            orig = Exception(1213, "Deadlock found when trying to get lock")
            raise OperationalError("INSERT INTO result ...", None, orig)
        await real_write(upserts, deletes, epochs, grants)

    sink._write_once = deadlock_once  # type: ignore[method-assign]
    try:
        row = ResultRow("c", "m", 1, 10, 20261111)
        with caplog.at_level("WARNING", logger="coupon_stream.connectors.mysql"):
            assert (await sink.write({(1, 20261111): row})).written
        assert await sink.fetch_all() == [tuple(row)]
        assert sink.available
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "deadlocked with another worker's" in caplog.text
    finally:
        await sink.stop()


async def _sink_with_check(tmp_path: Path) -> ResultSink:
    """A sink whose table refuses cumulate_amount >= 1000000, as MySQL refuses a BIGINT
    overflow (error 1264): a row refused as data, not a database that is down."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    engine = sqlalchemy.create_engine(url.replace("+aiosqlite", ""))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE result (gmt_create VARCHAR(255), gmt_modified VARCHAR(255), "
            "buyer_id BIGINT NOT NULL, cumulate_amount BIGINT NOT NULL "
            "CHECK (cumulate_amount < 1000000), effect_time BIGINT NOT NULL, "
            "PRIMARY KEY (buyer_id, effect_time))"
        )
    engine.dispose()
    sink = ResultSink(url, "result")
    await sink.start()
    return sink


async def test_a_row_refused_as_data_is_set_aside_and_the_rest_of_its_batch_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await _sink_with_check(tmp_path)
    rejected_before = sample("coupon_sink_rejected_rows_total")
    try:
        assert (await sink.write({(3, 20261111): ResultRow("c", "m", 3, 30, 20261111)})).written
        rows: dict[tuple[int, int], ResultRow | None] = {
            (b, 20261111): ResultRow("c", "m", b, b * 10, 20261111) for b in range(1, 6)
        }
        rows[(3, 20261111)] = ResultRow("c", "m", 3, 5_000_000, 20261111)  # refused
        rows[(9, 20261111)] = None  # a delete in the same batch
        with caplog.at_level("ERROR", logger="coupon_stream.connectors.mysql"):
            result = await asyncio.wait_for(sink.write(rows), 10)
        assert result.written
        ((key, row, why),) = result.rejected
        assert key == (3, 20261111) and row == rows[(3, 20261111)]
        assert "CHECK constraint failed" in why
        assert await sink.fetch_all() == [
            ("c", "m", b, 30 if b == 3 else b * 10, 20261111) for b in range(1, 6)
        ]  # the refused key keeps its last valid value
        assert sample("coupon_sink_rejected_rows_total") == rejected_before + 1
        assert "buyer_id=3 effect_time=20261111" in caplog.text
        assert sink.available
    finally:
        await sink.stop()


async def test_every_refused_row_of_a_large_batch_is_found_alone(tmp_path: Path) -> None:
    sink = await _sink_with_check(tmp_path)
    try:
        bad = {17, 18, 400, 2999}
        rows = {
            (b, 20261111): ResultRow(None, None, b, 2_000_000 if b in bad else 1, 20261111)
            for b in range(3000)
        }
        result = await asyncio.wait_for(sink.write(rows), 30)
        assert result.written
        assert sorted(key[0] for key, _, _ in result.rejected) == sorted(bad)
        assert len(await sink.fetch_all()) == 3000 - len(bad)
    finally:
        await sink.stop()


async def test_a_transient_error_is_retried_before_a_permanent_one_splits_the_batch(
    tmp_path: Path,
) -> None:
    sink = await _sink_with_check(tmp_path)
    real_write = sink._write_once
    failures = [OSError("connection reset")]

    async def flaky(
        upserts: list[ResultRow],
        deletes: Sequence[tuple[int, int]],
        epochs: dict[int, int],
        grants: Sequence[Grant],
    ) -> None:
        if failures:
            raise failures.pop()
        await real_write(upserts, deletes, epochs, grants)

    sink._write_once = flaky  # type: ignore[method-assign]
    try:
        rows = {
            (1, 1): ResultRow(None, None, 1, 1, 1),
            (2, 1): ResultRow(None, None, 2, 10**7, 1),
        }
        result = await asyncio.wait_for(sink.write(rows), 10)
        assert result.written and [k for k, _, _ in result.rejected] == [(2, 1)]
        assert await sink.fetch_all() == [(None, None, 1, 1, 1)]
    finally:
        await sink.stop()


@pytest.mark.asyncio
async def test_a_database_gone_silent_answers_readiness_within_the_ping_timeout() -> None:
    """A server that accepts connections and then says nothing (a network cut that drops
    bytes) would hold a health check for the driver's timeouts; the ping answers False
    within its own, and the next one waits for the ping still running."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = ResultSink(f"mysql+asyncmy://u:p@127.0.0.1:{port}/db", "result")
    sink._engine = mysql._engine(sink._url, None)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await sink.ping(timeout=0.3) is False
        assert await sink.ping(timeout=0.3) is False
        assert loop.time() - began < 2 and not sink.available
        assert len(accepted) == 1  # the second call waited for the first's ping
    finally:
        await sink.stop()
        server.close()
