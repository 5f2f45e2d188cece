"""The rescale's pure parts: reading a stored value as of the committed offset, writing it
at offset 0, the watermark and the progress mark (the whole run: tests/integration)."""

from __future__ import annotations

import asyncio

import pytest

from coupon_stream.core.stored import at_start, read_value
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools.rescale import (
    Mark,
    RescaleUnsafe,
    mark_topic,
    newest,
    rescale,
    target,
)
from tests.unit.fakes import BuyersChangelog, NullOut


def test_the_newest_watermark_wins_as_the_state_stage_stores_it():
    """The watermark the state stage keeps (an int), not a list: `newest` indexed it once,
    and every rescale with retention on failed (docs/design.md, "Rescaling")."""
    from coupon_stream.core.stored import WATERMARK_KEY
    from tests.unit.stagekit import World, r

    world = World(settings=Settings(app_id="unit", partitions=1, state_retention_days=30))
    world.append([r(day=20261101), r(order="o2", day=20261103)])
    stage = world.worker()
    asyncio.run(world.run(stage, every=1))
    (raw,) = stage.stores["days"].get_many(0, [WATERMARK_KEY])
    assert raw is not None
    stored = read_value(raw, len(world.log))
    assert stored == 20261103
    assert newest(None, None) is None
    assert newest(None, stored) == stored
    assert newest(20261112, 20261110) == 20261112
    assert newest(20261102, stored) == 20261103


def test_the_mark_round_trips_and_names_the_new_app():
    mark = Mark("old", 4, 12, done=[0, 2], records=10, watermark=20261111)
    assert Mark.decode(mark.encode()) == mark
    new = target(Settings(app_id="old", partitions=4), "new", 12)
    assert (new.app_id, new.partitions, new.by_buyer_topic) == ("new", 12, "new-payments-by-buyer")
    assert new.changelog_topics["days"] == "new-days-changelog"
    assert mark_topic(new) == "new-rescale"


@pytest.mark.parametrize(
    ("partitions", "app_id", "said"),
    [
        (0, "new", "--partitions: Input should be greater than or equal to 1"),
        (-3, "new", "--partitions: Input should be greater than or equal to 1"),
        (4, "bad app/id", "--to-app-id: Value error, must be 1 to 200 of the characters"),
        (4, "", "--to-app-id: Value error"),
        (4, "x" * 201, "--to-app-id: Value error"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(partitions, app_id, said):
    """Refused before the first request: the broker here does not exist, and the mark topic,
    the new topics and the fences are never touched."""
    old = Settings(app_id="old", partitions=4, broker="kafka://127.0.0.1:1")
    with pytest.raises(RescaleUnsafe) as refused:
        asyncio.run(asyncio.wait_for(rescale(old, partitions, app_id), 5))
    assert str(refused.value).startswith(said)


def test_a_group_the_coordinator_could_not_describe_is_no_empty_group():
    from coupon_stream.tools.rescale import live_groups

    member = ("m-1", "c", "/127.0.0.1", b"", b"")
    assert live_groups([(0, "old", "Empty", "consumer", "", [])]) == []
    assert live_groups([(0, "old", "Stable", "consumer", "range", [member])]) == ["old"]
    for code, name in ((14, "GroupLoadInProgressError"), (30, "GroupAuthorizationFailedError")):
        with pytest.raises(RescaleUnsafe, match=f"old could not be described \\({name}"):
            live_groups([(code, "old", "", "", "", [])])


def test_a_resumed_rescale_refuses_partitions_whose_source_moved_since():
    from coupon_stream.tools.rescale import check_not_moved_since

    old, new = Settings(app_id="old", partitions=3), Settings(app_id="new", partitions=6)
    mark = Mark("old", 3, 6, done=[0, 2], moved={"0": [10, 40, 41], "2": [7, 9, 9]})
    now = {0: [10, 40, 41], 1: [5, 5, 5], 2: [7, 9, 9]}
    check_not_moved_since(old, new, mark, now)  # where they were: go on
    now[1] = [8, 9, 9]  # not moved yet: it will be moved as of now
    check_not_moved_since(old, new, mark, now)
    now[2] = [12, 15, 15]  # the old workers ran again
    with pytest.raises(RescaleUnsafe, match=r"old partition\(s\) 2 \(committed offset"):
        check_not_moved_since(old, new, mark, now)
    legacy = Mark("old", 3, 6, done=[0])  # a mark that does not say what 0 was moved as of
    with pytest.raises(RescaleUnsafe, match="another --to-app-id"):
        check_not_moved_since(old, new, legacy, {0: [10, 40, 41]})


def test_a_rescale_s_memory_does_not_grow_with_the_number_of_buyers(monkeypatch):
    """A process once kept every buyer's new partition (about 83 bytes a buyer): gigabytes
    for a state of tens of millions of buyers. Peak memory now stays put as buyers grow
    past what it keeps at hand (made small here, so that the test runs in a second)."""
    import tracemalloc

    from coupon_stream.tools import rescale as module
    from coupon_stream.tools.rescale import move_partition

    monkeypatch.setattr(module, "ROUTES_CACHED", 1000)
    monkeypatch.setattr(module, "IN_FLIGHT_BATCHES", 50)

    old, new = Settings(app_id="old", partitions=4), Settings(app_id="new", partitions=12)

    def peak(buyers: int) -> int:
        tracemalloc.start()
        try:
            changelog = BuyersChangelog(buyers, at_start([1, 1, None, None]))
            moved = asyncio.run(move_partition(changelog, NullOut(), old, new, 0, 0))
            assert moved[0] == 2 * buyers  # both tables' changelogs
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = peak(3000), peak(12_000)
    assert many < 1.3 * few, (few, many)
