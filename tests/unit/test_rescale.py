"""The rescale's pure parts: reading a stored value as of the committed offset, writing it
at offset 0, the watermark and the progress mark (the whole run: tests/integration)."""

from __future__ import annotations

from coupon_stream.core.records import partition_for_buyer
from coupon_stream.core.state import Versioned, buyer_of_key, day_key, entry_key
from coupon_stream.foundation.settings import Settings
from coupon_stream.tools.rescale import Mark, as_of, at_start, mark_topic, newest, target


def test_a_value_is_read_as_a_takeover_reads_it():
    stored = Versioned(sid=3, version=120, current=[5, 1, None, None], previous=[2, 1, None, None])
    assert as_of(stored.encode(), committed=120) == [5, 1, None, None]
    assert as_of(stored.encode(), committed=100) == [2, 1, None, None]  # cut-short checkpoint
    assert as_of(Versioned(3, 120, [5], None).encode(), committed=100) is None  # not yet there


def test_a_moved_value_is_current_before_the_new_app_s_first_message():
    raw = at_start([7, 2, "2026-11-11 00:00:00", None])
    moved = Versioned.decode(raw)
    assert moved.version == 0 and moved.previous is None
    assert moved.as_of(0, sid=99) == [7, 2, "2026-11-11 00:00:00", None]


def test_every_state_key_names_its_buyer_and_so_its_new_partition():
    for buyer in (0, 1, -5, 2**63 - 1, -(2**63), 10_000_123):
        assert buyer_of_key(entry_key(buyer, "o1", "2")) == buyer
        assert buyer_of_key(day_key(buyer, 20261111)) == buyer
        assert 0 <= partition_for_buyer(buyer, 12) < 12


def test_the_newest_watermark_wins():
    assert newest(None, None) is None
    assert newest(None, [0, 20261110]) == [0, 20261110]
    assert newest([0, 20261112], [0, 20261110]) == [0, 20261112]
    assert newest([0, 20261110], [0, 20261112]) == [0, 20261112]


def test_the_mark_round_trips_and_names_the_new_app():
    mark = Mark("old", 4, 12, done=[0, 2], records=10, watermark=[0, 20261111])
    assert Mark.decode(mark.encode()) == mark
    new = target(Settings(app_id="old", partitions=4), "new", 12)
    assert (new.app_id, new.partitions, new.by_buyer_topic) == ("new", 12, "new-payments-by-buyer")
    assert new.changelog_topics["days"] == "new-days-changelog"
    assert mark_topic(new) == "new-rescale"
