"""The stored format: every key, value and mark round-trips through its one encoder and
decoder (`coupon_stream.core.stored`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coupon_stream.core.records import partition_for_buyer
from coupon_stream.core.stored import (
    MARK_KEYS,
    META_KEYS,
    STATE_FORMAT,
    VERSION_BASE_KEY,
    StateFormatError,
    Versioned,
    at_start,
    buyer_of_key,
    buyer_prefix,
    day_key,
    day_marker,
    entry_key,
    is_day_key,
    marks,
    parse_day_key,
    read_marks,
    read_superseded,
    read_value,
    rebased,
    start_marks,
)

buyers = st.integers(-(2**63), 2**63 - 1)
days = st.integers(10101, 99991231)
texts = st.text(max_size=40)
values = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | texts,
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)
offsets = st.integers(0, 2**62)


@given(buyers, texts, texts, days)
def test_keys_round_trip_and_start_with_their_buyer(buyer, order, status, day):
    key = day_key(buyer, day)
    assert parse_day_key(key) == (buyer, day) and is_day_key(key)
    assert buyer_of_key(key) == buyer == buyer_of_key(entry_key(buyer, order, status))
    assert key.startswith(buyer_prefix(buyer))
    assert entry_key(buyer, order, status).startswith(buyer_prefix(buyer))
    assert not any(is_day_key(m) for m in META_KEYS)


@given(st.integers(0, 2**56), offsets, values, values, offsets, st.integers(0, 2**56))
def test_a_value_round_trips_and_reads_as_of_the_committed_offset(
    sid, version, current, previous, committed, reader
):
    stored = Versioned(sid, version, current, previous)
    raw = stored.encode()
    assert Versioned.decode(raw) == stored
    assert read_value(raw, committed, reader) == stored.as_of(committed, reader)
    value, superseded = read_superseded(raw, committed, reader)
    assert value == stored.as_of(committed, reader)
    assert superseded == (version > committed and sid != reader)
    moved = rebased(raw, committed)
    as_committed = stored.as_of(committed, -1)
    if as_committed is None:
        assert moved is None  # absent as of the committed offset: a delete
    else:
        assert moved is not None and Versioned.decode(moved).as_of(0, reader) == as_committed
        assert read_value(moved, 0) == read_value(at_start(as_committed), 0)


entries = st.tuples(days, buyers, st.none() | texts, st.none() | texts).map(list)


@given(st.integers(0, 2**56), offsets, entries, st.none() | entries)
def test_an_entry_s_stored_bytes_hold_the_marker_of_each_copy_s_day(
    sid, version, current, previous
):
    """The pre-filter of a day's entries never drops one: a read returns the current or the
    previous copy, and the stored bytes hold the marker of each one's day."""
    raw = Versioned(sid, version, current, previous).encode()
    assert day_marker(current[0]) in raw
    if previous is not None:
        assert day_marker(previous[0]) in raw


@given(offsets, offsets, offsets)
def test_marks_round_trip(next_offset, high, base):
    written = {**marks(next_offset, high), VERSION_BASE_KEY: start_marks(base)[VERSION_BASE_KEY]}
    assert set(written) <= META_KEYS
    read = read_marks(0, *(written.get(k) for k in MARK_KEYS))
    assert read == (next_offset, max(high, next_offset), base)
    assert read_marks(0, None, None) == (None, 0, 0)
    assert read_marks(0, *(start_marks(base).get(k) for k in MARK_KEYS)) == (0, 0, base)


def test_state_of_another_format_is_refused_with_what_to_do():
    with pytest.raises(StateFormatError, match=f"format {STATE_FORMAT - 1}.*COUPON_APP_ID"):
        read_marks(3, b"10", str(STATE_FORMAT - 1).encode())


def test_a_value_is_read_as_a_takeover_reads_it():
    stored = Versioned(sid=3, version=120, current=[5, 1, None, None], previous=[2, 1, None, None])
    assert read_value(stored.encode(), 120) == [5, 1, None, None]
    assert read_value(stored.encode(), 100) == [2, 1, None, None]  # cut-short checkpoint
    assert read_value(Versioned(3, 120, [5], None).encode(), 100) is None  # not yet there


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


def test_keys_are_bounded_and_sort_by_buyer():
    assert len(day_key(-(2**63), 20261111)) == len(day_key(2**63 - 1, 99991231)) == 12
    assert parse_day_key(day_key(-5, 20261111)) == (-5, 20261111)
    keys = [entry_key(b, "o", "2") for b in (-3, -1, 0, 1, 2**40)]
    assert keys == sorted(keys)


def test_a_value_written_past_the_committed_offset_by_another_session_reads_as_before():
    rec = Versioned(sid=1, version=10, current=["new"], previous=["old"])
    assert rec.as_of(committed=10, sid=2) == ["new"]  # that checkpoint was committed
    assert rec.as_of(committed=4, sid=2) == ["old"]  # it never was: roll it back
    assert rec.as_of(committed=4, sid=1) == ["new"]  # our own, not yet committed
    assert Versioned.decode(rec.encode()) == rec


def test_the_fast_read_of_a_record_is_as_of():
    for rec in (Versioned(1, 10, ["n"], ["o"]), Versioned(2, 3, None, ["o"])):
        for committed, session in ((10, 2), (4, 2), (4, 1), (2, 5)):
            assert read_value(rec.encode(), committed, session) == rec.as_of(committed, session)


def test_state_key_golden_values():
    """A state key that changed would never match the kept copy: every copy would count again."""
    assert entry_key(42, "o1", "2").hex() == "800000000000002a5b226f31222c2232225d"
    assert (
        entry_key(-5, 'o"\\\n\x01双', "x").hex()
        == "7ffffffffffffffb5b226f5c225c5c5c6e5c7530303031e58f8c222c2278225d"
    )
