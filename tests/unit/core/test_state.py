from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.core import state
from coupon_stream.core.records import INT64_MAX
from coupon_stream.core.state import (
    CURRENT,
    KEPT,
    MAX_MODIFIED,
    MIN_CREATED,
    Outcome,
    ResultRow,
    apply_row,
    day_row,
    generated_before,
    latest_day,
    recomputed,
    retention_cutoff,
)
from coupon_stream.core.stored import day_key, entry_key, parse_day_key
from tests import reference
from tests.unit.stagekit import r


class DictView:
    """The tables as plain dicts of cells, each key's present: the state logic alone."""

    def __init__(self):
        self.entries = defaultdict(lambda: [None, None])
        self.days = defaultdict(lambda: [None, None])
        self.stale, self.touched = set(), set()
        self.extremes = {}

    def day_cell(self, key):
        return self.days[key]

    def row(self, buyer, day):
        return day_row(buyer, day, self.days[day_key(buyer, day)][CURRENT])


def test_first_generated_copy_wins_whatever_the_arrival_order():
    v = DictView()
    late, early = r(gm="2026-11-11 00:10:00", yuan=11), r(gm="2026-11-11 00:00:05")
    assert apply_row(v, late).outcome is Outcome.NEW
    assert apply_row(v, early).outcome is Outcome.REPLACED
    assert apply_row(v, late).outcome is Outcome.DUPLICATE
    # the day's only entry was replaced: its MIN/MAX are the early copy's, nothing to recompute
    assert v.stale == set()
    assert v.row(7, 20261111) == ResultRow(
        "2026-11-11 00:00:00", "2026-11-11 00:00:05", 7, 10, 20261111
    )


def test_a_replaced_extremum_among_other_entries_marks_the_day_for_recompute():
    v = DictView()
    apply_row(v, r("o1", gm="2026-11-11 00:00:03"))
    apply_row(v, r("o2", gm="2026-11-11 00:10:00", yuan=11))
    apply_row(v, r("o2", gm="2026-11-11 00:00:05", yuan=12))  # takes MAX's holder's place
    # the later copy held MAX(gmt_modified), which cannot be retracted: the checkpoint
    # recomputes it from the day's entries
    assert v.stale == {day_key(7, 20261111)}
    assert v.row(7, 20261111).cumulate_amount == 22


def recompute(v, buyer, effect_time):
    """What the checkpoint does with a stale day."""
    key = day_key(buyer, effect_time)
    kept = [e[CURRENT] for e in v.entries.values() if e[CURRENT] is not None]
    mine = [e for e in kept if e[0] == effect_time]
    v.days[key][CURRENT], v.extremes[key] = recomputed(v.days[key][CURRENT], mine)
    v.stale.discard(key)


def test_a_recomputed_day_keeps_its_extremes_and_is_not_read_again():
    v = DictView()
    key = day_key(7, 20261111)
    for i in range(KEPT + 2):  # more entries than kept values
        apply_row(v, r(f"o{i}", gm=f"2026-11-11 00:10:{i:02d}"))
    apply_row(v, r(f"o{KEPT + 1}", gm="2026-11-11 00:00:01"))  # the MAX's holder, replaced
    assert v.stale == {key}
    recompute(v, 7, 20261111)  # keeps o1's to o{KEPT}'s, o0's is not kept
    assert v.row(7, 20261111).gmt_modified == f"2026-11-11 00:10:{KEPT:02d}"
    for i in range(KEPT, 1, -1):  # each kept MAX replaced by a copy below every value
        apply_row(v, r(f"o{i}", gm=f"2026-11-11 00:00:{i:02d}"))
        assert v.row(7, 20261111).gmt_modified == f"2026-11-11 00:10:{i - 1:02d}"
        assert v.stale == set()
    apply_row(v, r("o1", gm="2026-11-11 00:00:01"))  # the last kept one: o0's is read again
    assert v.stale == {key}
    recompute(v, 7, 20261111)
    assert v.row(7, 20261111).gmt_modified == "2026-11-11 00:10:00"


def test_a_copy_that_reaches_the_extremum_again_needs_no_recompute():
    v = DictView()
    apply_row(v, r("o1", gc="2026-11-11 00:00:01", gm="2026-11-11 00:00:05"))
    apply_row(v, r("o2", gc="2026-11-11 00:00:02", gm="2026-11-11 00:00:09"))
    # o1 holds MIN(gmt_create); its earlier copy has the same gmt_create: still the MIN
    apply_row(v, r("o1", gc="2026-11-11 00:00:01", gm="2026-11-11 00:00:04", yuan=2))
    assert v.stale == set()
    assert v.row(7, 20261111) == ResultRow(
        "2026-11-11 00:00:01", "2026-11-11 00:00:09", 7, 12, 20261111
    )
    # a copy created later than the MIN it replaces: only a recompute finds o2's
    apply_row(v, r("o1", gc="2026-11-11 00:00:03", gm="2026-11-11 00:00:03", yuan=3))
    assert v.stale == {day_key(7, 20261111)}
    recompute(v, 7, 20261111)
    assert v.row(7, 20261111).gmt_create == "2026-11-11 00:00:02"
    # from then on, the day knows its next MIN itself
    apply_row(v, r("o2", gc="2026-11-11 00:00:04", gm="2026-11-11 00:00:08"))
    assert v.stale == set()
    assert v.row(7, 20261111).gmt_create == "2026-11-11 00:00:03"


days_ = st.sampled_from([20261111, 20261112])
stamps = st.none() | st.integers(0, 40).map(lambda s: f"2026-11-11 00:00:{s:02d}")


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), days_, stamps, stamps), max_size=80),
    st.integers(1, KEPT),
    st.data(),
)
def test_min_and_max_equal_the_kept_entries_after_any_records(records, kept, data):
    """After each record, a day not marked stale holds the MIN/MAX of its kept entries, and
    a recompute (as the checkpoint's) makes every stale one so; with lists of any length,
    so that they run out too."""
    saved = state.KEPT
    state.KEPT = kept
    try:
        _check_min_and_max(records, data)
    finally:
        state.KEPT = saved


def _check_min_and_max(records, data):
    v = DictView()
    for order, day, gc, gm in records:
        apply_row(v, r(f"o{order}", day=day, gc=gc, gm=gm))
        if data.draw(st.booleans(), "checkpoint"):
            for key in list(v.stale):
                if v.days[key][CURRENT] is not None:
                    recompute(v, *parse_day_key(key))
            v.stale.clear()
        for effect_time in (20261111, 20261112):
            key = day_key(7, effect_time)
            day = v.days[key][CURRENT]
            mine = [
                e[CURRENT]
                for e in v.entries.values()
                if e[CURRENT] and e[CURRENT][0] == effect_time
            ]
            if day is None or key in v.stale:
                continue
            created = [e[2] for e in mine if e[2] is not None]
            modified = [e[3] for e in mine if e[3] is not None]
            assert day[MIN_CREATED] == min(created, default=None)
            assert day[MAX_MODIFIED] == max(modified, default=None)


def test_day_sum_min_create_max_modified_and_delete_at_zero():
    v = DictView()
    apply_row(v, r("o1", yuan=123, gc="2026-11-11 00:00:09", gm="2026-11-11 00:00:10"))
    apply_row(v, r("o2", yuan=50, gc=None, gm="2026-11-11 00:00:20"))
    apply_row(v, r("o3", day=20261112, yuan=99))
    assert v.row(7, 20261111) == ResultRow(
        "2026-11-11 00:00:09", "2026-11-11 00:00:20", 7, 173, 20261111
    )
    apply_row(v, r("o1", "4", yuan=-123, gc="2026-11-11 01:00:00", gm="2026-11-11 01:00:00"))
    assert v.row(7, 20261111).cumulate_amount == 50
    apply_row(v, r("o2", "4", yuan=-50, gm="2026-11-11 02:00:00"))
    assert v.row(7, 20261111) is None  # total 0: the row is deleted
    apply_row(v, r("o4", yuan=1))
    assert v.row(7, 20261111).cumulate_amount == 1  # and comes back above zero
    assert v.row(7, 20261112).cumulate_amount == 99


def test_an_earlier_copy_of_another_day_moves_the_contribution():
    v = DictView()
    apply_row(v, r("o1", day=20261112, yuan=40, gm="2026-11-12 00:00:09"))
    v.touched.clear()
    applied = apply_row(v, r("o1", day=20261111, yuan=30, gm="2026-11-11 00:00:01"))
    assert applied.outcome is Outcome.REPLACED and v.touched == {(7, 20261112), (7, 20261111)}
    assert v.row(7, 20261112) is None and v.days[day_key(7, 20261112)][CURRENT] is None
    assert v.row(7, 20261111).cumulate_amount == 30


def test_a_record_that_would_overflow_its_day_is_refused_and_changes_nothing():
    v = DictView()
    big = INT64_MAX // 100 * 60  # each fits a BIGINT, two do not
    assert apply_row(v, r("o1", yuan=big)).outcome is Outcome.NEW
    refused = apply_row(v, r("o2", yuan=big))
    assert refused.outcome is Outcome.OVERFLOW
    assert refused.reason.startswith("cumulate_amount would overflow BIGINT")
    assert v.entries[entry_key(7, "o2", "2")][CURRENT] is None
    assert v.touched == {(7, 20261111)}  # by the first record only
    assert v.row(7, 20261111).cumulate_amount == big  # the day keeps its last valid value
    assert apply_row(v, r("o3", yuan=-big)).outcome is Outcome.NEW


def test_retention_cutoff_crosses_months_and_leap_days_and_never_raises():
    assert retention_cutoff(20261104, 2) == 20261102
    assert retention_cutoff(20261201, 1) == 20261130
    assert retention_cutoff(20240301, 1) == 20240229
    assert retention_cutoff(20260101, 7) == 20251225
    assert retention_cutoff(10101, 30) == 10101  # year 0001: the cutoff stops at 0001-01-01
    assert retention_cutoff(99991231, 30) == 99991201
    assert latest_day(1_794_096_000_000, 1) == 20261109  # received 2026-11-08
    assert latest_day(253402300799000, 5) == 99991231  # no date after 9999-12-31


def test_generated_before_prefers_earlier_and_non_null():
    assert generated_before("2026-01-01 00:00:00", "2026-01-01 00:00:01")
    assert not generated_before("2026-01-01 00:00:01", "2026-01-01 00:00:00")
    assert not generated_before("2026-01-01 00:00:00", "2026-01-01 00:00:00")  # tie
    assert generated_before("2026-01-01 00:00:00", None)
    assert not generated_before(None, "2026-01-01 00:00:00")
    assert not generated_before(None, None)


def test_reference_truncates_per_record_before_summing():
    base = {"biz_order_id": "o1", "pay_status": "2", "buyer_id": "1",
            "pay_time": "2026-11-11 10:00:00"}  # fmt: skip
    orders = [
        {**base, "div_idx_actual_total_fee": 199.0},
        {**base, "biz_order_id": "o2", "div_idx_actual_total_fee": 199.0},
    ]
    refunds = [
        {**base, "pay_status": "4", "refund_fee": -12399.0},
        {**base, "biz_order_id": "o9", "pay_status": "4", "refund_fee": 12500.0},
    ]
    assert reference.evaluate(orders, refunds) == {(None, None, 1, 1 + 1 - 123 + 125, 20261111)}
