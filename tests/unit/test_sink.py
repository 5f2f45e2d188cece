"""The result sink's driver-level statements, run against SQLite (the MariaDB path is in
tests/integration)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from coupon_stream.sink import ResultSink
from coupon_stream.state import ResultRow


@pytest.mark.asyncio
async def test_upserts_overwrite_and_deletes_remove(tmp_path: Path) -> None:
    sink = ResultSink(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "result")
    await sink.start()
    try:
        first = {(b, 20261111): ResultRow("c", "m", b, b * 10, 20261111) for b in range(1, 2500)}
        await sink.write(first)
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

    async def down(upserts: object, deletes: object) -> None:
        nonlocal attempts
        attempts += 1
        raise OSError("database down")

    sink._write_once = down  # type: ignore[method-assign]
    try:
        row = {(1, 20261111): ResultRow("c", "m", 1, 10, 20261111)}
        wanted = iter([True, False])
        assert not await asyncio.wait_for(sink.write(row, still_wanted=lambda: next(wanted)), 10)
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

    async def deadlock_once(upserts: list, deletes: list) -> None:
        nonlocal deadlocks
        if deadlocks:
            deadlocks -= 1
            orig = Exception(1213, "Deadlock found when trying to get lock")
            raise OperationalError("INSERT INTO result ...", None, orig)
        await real_write(upserts, deletes)

    sink._write_once = deadlock_once  # type: ignore[method-assign]
    try:
        row = ResultRow("c", "m", 1, 10, 20261111)
        with caplog.at_level("WARNING", logger="coupon_stream.sink"):
            assert await sink.write({(1, 20261111): row})
        assert await sink.fetch_all() == [tuple(row)]
        assert sink.available
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "deadlocked with another worker's" in caplog.text
    finally:
        await sink.stop()
