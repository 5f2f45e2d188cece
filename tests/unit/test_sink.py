"""The result sink's driver-level statements, run against SQLite (the MariaDB path is in
tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
