"""The worker's app in Faust's in-memory test context: the state agent, its checkpoint and
commit through Faust's real consumer, rebalances and readiness (fixtures in conftest.py)."""

from __future__ import annotations

import asyncio

from faust.types import TP

from coupon_stream.connectors import engine
from coupon_stream.core.records import decode_rows
from coupon_stream.core.state import STATE_TABLES, ResultRow
from coupon_stream.core.stored import HIGH_MARK_KEY, NEXT_OFFSET_KEY, Versioned, day_key, entry_key
from tests.unit.conftest import batch, changelog, group, put, row, stored
from tests.unit.fakes import DownSink
from tests.unit.samples import sample


async def test_state_agent_dedups_aggregates_and_deletes(stream):
    sink = stream.sink
    async with stream.state_agent.test_context() as agent:
        await put(
            stream,
            agent,
            batch(
                row("o1", 100, "2026-11-11 00:00:09"),
                row("o1", 100, "2026-11-11 00:00:01"),  # earlier copy replaces
                row("o2", 7, "2026-11-11 00:00:02", buyer=6),
            ),
        )
        assert sink.table == {
            (5, 20261111): ResultRow(
                "2026-11-11 00:00:00", "2026-11-11 00:00:01", 5, 100, 20261111
            ),
            (6, 20261111): ResultRow("2026-11-11 00:00:00", "2026-11-11 00:00:02", 6, 7, 20261111),
        }
        assert stored(stream, "entries", entry_key(5, "o1", "2"))[3] == "2026-11-11 00:00:01"
        # each changed key once per checkpoint, as RocksDB holds it, and the next offset
        days_log = changelog(stream, "days")
        assert sorted(k for k, _ in days_log) == sorted(
            [day_key(5, 20261111), day_key(6, 20261111), b"~format", HIGH_MARK_KEY, NEXT_OFFSET_KEY]
        )
        assert len(changelog(stream, "entries")) == 2
        await put(stream, agent, batch(row("o1", -100, "2026-11-11 01:00:00", "4")))
        assert (5, 20261111) not in sink.table
        writes = sink.writes
        # a replayed duplicate re-sends its key's current state
        await put(stream, agent, batch(row("o2", 7, "2026-11-11 00:00:02", buyer=6)))
        assert sink.writes == writes + 1
        assert sink.table[(6, 20261111)].cumulate_amount == 7


async def test_retention_expires_old_days_and_dead_letters_late_and_future_records(
    make_stream, tmp_path
):
    cs = make_stream(tmp_path, partitions=1, state_retention_days=2)
    async with cs.state_agent.test_context() as agent:
        for day in (20261101, 20261102, 20261103):
            await put(cs, agent, batch(row(f"o{day}", 5, "x", day=day, buyer=1)))
        await put(cs, agent, batch(row("n", 5, "x", day=20261104, buyer=2)))
        # watermark 20261104, 2 days kept -> cutoff 20261102: day 1 dropped from state
        assert stored(cs, "entries", entry_key(1, "o20261101", "2")) is None
        assert stored(cs, "days", day_key(1, 20261101)) is None
        assert stored(cs, "days", day_key(1, 20261102))[0] == 5
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5  # the closed day's row stays
        await put(cs, agent, batch(row("late", -5, "y", "4", 20261101, buyer=1)))
        assert cs.sink.table[(1, 20261101)].cumulate_amount == 5
        dead = cs.out.dead()
        assert len(dead) == 1
        reason = dict(dead[0]["headers"])["coupon.error.reason"]
        assert b"older than the retention cutoff 20261102" in reason
        assert decode_rows(dead[0]["value"])[0][1] == "late"


async def test_a_failed_changelog_send_is_sent_again_before_anything_is_committed(stream):
    retries = sample("coupon_changelog_retries_total")
    async with stream.state_agent.test_context() as agent:
        stream.out.fail_next = True
        await agent.put(batch(row("o1", 100, "2026-11-11 00:00:09")))
        await agent.put(batch(row("o2", 1, "2026-11-11 00:00:10")))
        await stream.checkpoint()
    assert sample("coupon_changelog_retries_total") == retries + 1
    log = dict(changelog(stream, "days"))
    raw = log[day_key(5, 20261111)]
    assert Versioned.decode(raw).current[0] == 101
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    store = stream.caches["days"].store
    assert store.offsets[0] == len(changelog(stream, "days")) - 1


async def test_a_refused_changelog_append_is_retried_and_the_agent_lives_on(stream):
    retries = sample("coupon_changelog_retries_total")
    async with stream.state_agent.test_context() as agent:
        stream.out.refuse_next = True
        for order, yuan, second in (("o1", 100, 9), ("o2", 1, 10)):
            await put(stream, agent, batch(row(order, yuan, f"2026-11-11 00:00:{second:02d}")))
    assert sample("coupon_changelog_retries_total") == retries + 1
    assert stream.sink.table[(5, 20261111)].cumulate_amount == 101
    assert group(stream).committed() == {0: 2}


def test_the_changelog_topics_the_worker_precreates_are_the_tables(stream):
    assert {c.changelog_topic for c in stream.caches.values()} == set(
        stream.settings.changelog_topics.values()
    )
    assert set(stream.caches) == set(STATE_TABLES)


async def test_the_state_agent_commits_what_it_checkpointed(stream):
    async with stream.state_agent.test_context() as agent:
        await put(stream, agent, batch(row("o1", 1, "x")), partition=3)
        await put(stream, agent, batch(row("o2", 1, "x")), partition=3)
    assert group(stream).committed() == {3: 2}
    # Faust's consumer holds the same view (what the state reads as of after a restart)
    assert engine.consumer_committed(stream.app, TP(stream.by_buyer.get_topic_name(), 3)) == 2


async def test_a_write_retrying_when_a_rebalance_starts_is_given_up_uncommitted(
    make_stream, tmp_path
):
    """A late write could land after the partitions' next owner's; it replays instead."""
    cs = make_stream(tmp_path, partitions=1)
    cs.sink = cs.checkpointer.sink = DownSink()
    await cs.stage.add(batch(row("o1", 100, "x")), 0, 0, "t0")
    checkpoint = asyncio.ensure_future(cs.checkpoint())
    await cs.sink.attempting.wait()
    cs.app.on_rebalance_start()
    await asyncio.wait_for(checkpoint, 5)
    assert cs.sink.table == {} and group(cs).committed() in ({}, {0: 0})  # 0: the claim's check
    assert cs.stage.sessions == {}  # its partitions start over from the committed offset
    # the state and its changelog keep the record, written past the committed offset
    assert stored(cs, "days", day_key(5, 20261111))[0] == 100


async def test_readiness_reports_a_stalled_partition(stream):
    now = [0.0]
    stream.stalls._clock = lambda: now[0]
    stream.stalls.assigned([0])
    now[0] = 10**6  # long after the assignment, nothing committed
    stream.stalls.check({0: 5})
    status = await stream.observe.readiness()
    assert status["stalled_partitions"] == [0] and not status["ready"]


async def test_a_worker_whose_intake_is_not_ready_is_not_ready(make_stream, tmp_path):
    """Its intake lost the intake group, or cannot forward: the state stage gets nothing new."""
    stream = make_stream(tmp_path, partitions=4)
    stream.intake.running = True  # as if its loop ran, with no consumer yet
    status = await stream.observe.readiness()
    assert status["intake"]["member"] is False and not status["ready"]
    apart = make_stream(tmp_path / "apart", partitions=4, intake=False)
    assert (await apart.observe.readiness())["intake"] is None  # left to intake processes


async def test_a_partition_moved_away_before_the_commit_is_left_out_of_it(stream):
    """Faust commits only what the group still assigns; the rest replays at its next owner."""
    topic = stream.by_buyer.get_topic_name()
    async with stream.state_agent.test_context() as agent:
        await agent.put(batch(row("o1", 1, "x")), partition=0)
        await agent.put(batch(row("o2", 1, "x", buyer=6)), partition=1)
        group(stream).assigned.discard(TP(topic, 1))
        await stream.checkpoint()
    # 1: 0 is the session's claim check (the group's own offset committed again), no more
    assert group(stream).committed() == {0: 1, 1: 0}
    assert engine.consumer_committed(stream.app, TP(topic, 1)) in (None, 0)


async def test_a_fenced_checkpoint_releases_it_and_what_was_applied_meanwhile(stream):
    """Faust's rebalance waits until every message it delivered is acknowledged or released:
    one forgotten after a dropped checkpoint would keep the worker out of its group for good."""
    sink = stream.sink
    write = sink.write
    first, second = batch(row("o1", 1, "x")), batch(row("o2", 2, "x"))
    stream.reader.log.update({(0, 0): first, (0, 1): second})  # the by-buyer log, read back
    applied: list[object] = []
    released: list[object] = []
    add, acknowledge = stream.stage.add, stream.checkpointer.acknowledge

    async def add_recorded(raw, partition, offset, token, *args, **kwargs):
        applied.append(token)
        await add(raw, partition, offset, token, *args, **kwargs)

    async def acknowledge_recorded(tokens, committed):
        released.extend(t for t in tokens if not committed)
        await acknowledge(tokens, committed)

    stream.stage.add = add_recorded
    stream.checkpointer.acknowledge = acknowledge_recorded
    async with stream.state_agent.test_context() as agent:
        await agent.put(first, partition=0)

        async def fenced_meanwhile(rows, still_wanted=None, epochs=None, grants=None):
            await agent.put(second, partition=0)  # applied meanwhile
            await sink.claim(0)  # a newer owner claims the partition
            return await write(rows, still_wanted, epochs, grants)

        sink.write = fenced_meanwhile
        await stream.checkpoint()
        assert sink.table == {}
        assert len(applied) == 2 and all(t in released for t in applied)
        assert group(stream).committed().get(0, 0) == 0
        assert sample("coupon_checkpoints_fenced_total", why="fenced") >= 1
        sink.write = write
        await put(stream, agent, batch(row("o3", 3, "x")), partition=0)  # claimed again
    assert sink.table[(5, 20261111)].cumulate_amount == 6  # all three, once each (replayed)
