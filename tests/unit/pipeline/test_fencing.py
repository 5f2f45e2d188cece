"""Each fence alone: a write holding an older claim is refused, and nothing of it lands.

The result table's fence runs on the real sink (SQLite here, MariaDB in
tests/integration/test_fencing.py, which also runs the changelogs' fence on a real
broker); the checkpoint's handling runs on the stage kit's in-memory stores, whose
changelog stand-in fences as the broker does.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.core.state import ResultRow
from coupon_stream.foundation.errors import Fenced, NotHeld
from coupon_stream.tools.dataset import generate
from tests.unit.pipeline.test_checkpoint import load, rows_of, spec_oracle
from tests.unit.stagekit import World

ROW = ResultRow("2026-11-11 00:00:00", "2026-11-11 00:00:05", 1, 10, 20261111)


@pytest.mark.asyncio
async def test_a_result_write_with_an_older_epoch_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    sink = ResultSink(url, "result", app_id="app")
    other_app = ResultSink(url, "result", app_id="other")
    await sink.start()
    await other_app.start()
    try:
        old = await sink.claim(3)
        new = await sink.claim(3)  # a newer owner's claim
        assert new == old + 1
        assert await other_app.claim(3) == 1  # epochs are per app and partition
        with pytest.raises(Fenced) as fenced:
            await sink.write({(1, 20261111): ROW, (2, 20261111): None}, epochs={3: old, 4: 9})
        assert fenced.value.partition == 3 and fenced.value.epoch == new
        assert "epoch 2" in str(fenced.value)
        assert await sink.fetch_all() == []
        assert (await sink.write({(1, 20261111): ROW}, epochs={3: new})).written
        assert await sink.fetch_all() == [tuple(ROW)]
        with pytest.raises(Fenced):  # a partition never claimed is no one's to write
            await sink.write({(1, 20261111): None}, epochs={5: 1})
        assert await sink.fetch_all() == [tuple(ROW)]
    finally:
        await sink.stop()
        await other_app.stop()


def world_of(seed: int) -> tuple[World, set[tuple[object, ...]]]:
    rnd = random.Random(seed)
    rows = rows_of(generate(60, seed=seed, buyers=4), rnd, messy=True)
    world = World()
    load(world, rows, rnd)
    return world, spec_oracle(rows)


@pytest.mark.asyncio
@pytest.mark.parametrize("taken_at", [0, 3, 7])
async def test_a_checkpoint_of_a_worker_whose_partition_was_claimed_lands_nowhere(
    taken_at: int,
) -> None:
    """Worker A applies messages, freezes; B claims the partition and runs; A wakes up and
    checkpoints: neither changelog nor table changes, A drops it, and B's result stands."""
    world, expected = world_of(taken_at)
    a = world.worker()
    await world.run(a, every=4, upto=taken_at)  # A's committed checkpoints
    end = min(taken_at + 5, len(world.log))
    for offset in range(world.committed, end):  # applied, not checkpointed: then A froze
        await a.stage.add(world.log[offset], 0, offset, offset, world.committed)
    b = world.worker()
    await world.run(b, every=3)  # B claims the partition and processes everything
    assert world.sink.rows() == expected
    logs = {k: list(v) for k, v in world.out.logs.items()}
    table, writes = dict(world.sink.table), world.sink.writes

    assert not await a.checkpoint.run()  # A wakes up: fenced
    assert {k: list(v) for k, v in world.out.logs.items()} == logs
    assert world.sink.table == table and world.sink.writes == writes
    assert a.stage.sessions == {} and a.stage.claims.epochs == {}
    assert world.committed == len(world.log)

    c = world.worker()  # a later owner restores what B (and nothing of A) wrote
    before = dict(world.sink.table)
    for offset in range(len(world.log) // 3):  # replayed duplicates change nothing
        await c.stage.add(world.log[offset], 0, len(world.log) + offset, offset, None)
    await c.checkpoint.run()
    assert world.sink.table == before


@pytest.mark.asyncio
async def test_a_result_write_fenced_after_its_changelog_is_dropped_uncommitted() -> None:
    """A froze between its changelog and its result rows; B claimed only the table's fence
    so far (a claim in progress): A's rows do not land and its offsets are not committed."""
    world, _ = world_of(11)
    a = world.worker()
    for offset in range(4):
        await a.stage.add(world.log[offset], 0, offset, offset, world.committed)
    await world.sink.claim(0)  # the newer owner's epoch
    assert not await a.checkpoint.run()
    assert world.sink.table == {} and world.committed == 0
    assert a.stage.sessions == {}


@pytest.mark.asyncio
async def test_a_session_is_not_begun_when_the_group_refuses_its_offset() -> None:
    """The claim's last step: a worker whose generation is gone begins no session."""
    world, _ = world_of(5)
    a = world.worker()

    async def refused(partition: int, offset: int) -> bool:
        return False

    a.stage.confirm = refused
    with pytest.raises(NotHeld):
        await a.stage.add(world.log[0], 0, 0, 0, None)
    assert a.stage.sessions == {} and not any(world.out.logs.values())
    assert await a.checkpoint.run()  # nothing applied: nothing to write
    assert world.sink.table == {}
