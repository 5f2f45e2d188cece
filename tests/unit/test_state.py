import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.core.records import INT64_MAX, Source, read_row
from coupon_stream.core.state import (
    Outcome,
    Record,
    ResultRow,
    apply_row,
    day_key,
    day_row,
    entry_key,
    generated_before,
    latest_day,
    parse_day_key,
    retention_cutoff,
)
from coupon_stream.tools.dataset import generate, jsonl
from tests import reference
from tests.unit.fakes import Crash
from tests.unit.stagekit import World


class DictView:
    """The tables as plain dicts: the state logic alone."""

    def __init__(self):
        self.entries, self.days, self.stale = {}, {}, set()

    def get_entry(self, key):
        return self.entries.get(key)

    def put_entry(self, key, value):
        self.entries[key] = value

    def get_day(self, key):
        return self.days.get(key)

    def put_day(self, key, value):
        if value is None:
            self.days.pop(key, None)
        else:
            self.days[key] = value

    def row(self, buyer, day):
        return day_row(buyer, day, self.days.get(day_key(buyer, day)))


def r(order="o1", status="2", day=20261111, yuan=10, gc="2026-11-11 00:00:00",
      gm="2026-11-11 00:00:05", buyer=7):  # fmt: skip
    return [buyer, order, status, day, yuan, gc, gm]


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
    applied = apply_row(v, r("o1", day=20261111, yuan=30, gm="2026-11-11 00:00:01"))
    assert applied.outcome is Outcome.REPLACED and applied.days == (20261112, 20261111)
    assert v.row(7, 20261112) is None and day_key(7, 20261112) not in v.days
    assert v.row(7, 20261111).cumulate_amount == 30


def test_a_record_that_would_overflow_its_day_is_refused_and_changes_nothing():
    v = DictView()
    big = INT64_MAX // 100 * 60  # each fits a BIGINT, two do not
    assert apply_row(v, r("o1", yuan=big)).outcome is Outcome.NEW
    refused = apply_row(v, r("o2", yuan=big))
    assert refused.outcome is Outcome.REFUSED
    assert refused.reason.startswith("cumulate_amount would overflow BIGINT")
    assert entry_key(7, "o2", "2") not in v.entries
    assert v.row(7, 20261111).cumulate_amount == big  # the day keeps its last valid value
    assert apply_row(v, r("o3", yuan=-big)).outcome is Outcome.NEW


def test_keys_are_bounded_and_sort_by_buyer():
    assert len(day_key(-(2**63), 20261111)) == len(day_key(2**63 - 1, 99991231)) == 12
    assert parse_day_key(day_key(-5, 20261111)) == (-5, 20261111)
    keys = [entry_key(b, "o", "2") for b in (-3, -1, 0, 1, 2**40)]
    assert keys == sorted(keys)


def test_a_value_written_past_the_committed_offset_by_another_session_reads_as_before():
    rec = Record(session=1, version=10, current=["new"], previous=["old"])
    assert rec.as_of(committed=10, session=2) == ["new"]  # that checkpoint was committed
    assert rec.as_of(committed=4, session=2) == ["old"]  # it never was: roll it back
    assert rec.as_of(committed=4, session=1) == ["new"]  # our own, not yet committed
    assert Record.decode(rec.encode()) == rec


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


# -- the stage and its checkpoint, against an oracle, through crashes ----------------------


def spec_oracle(rows):
    """docs/semantics.md steps 2-4 by brute force over rows in arrival order."""
    kept = {}
    for row in rows:
        key = (row[0], row[1], row[2])
        old = kept.get(key)
        if old is None or generated_before(row[6], old[6]):
            kept[key] = row
    days = {}
    for buyer, _, _, day, yuan, gc, gm in kept.values():
        total, created, modified = days.get((buyer, day), (0, None, None))
        created = gc if created is None or (gc is not None and gc < created) else created
        modified = gm if modified is None or (gm is not None and gm > modified) else modified
        days[(buyer, day)] = (total + yuan, created, modified)
    return {(c, m, b, t, d) for (b, d), (t, c, m) in days.items() if t > 0}


def rows_of(data, rnd, messy=False):
    rows = [read_row(m, Source.ORDERS) for m in jsonl(data.orders)]
    rows += [read_row(m, Source.REFUNDS) for m in jsonl(data.refunds)]
    if messy:  # copies that move days and change gmt_create: MIN/MAX not retractable
        for row in rnd.sample(rows, len(rows) // 5):
            copy = list(row)
            copy[3] = rnd.choice((20261111, 20261112, 20261113))
            copy[5] = rnd.choice((None, "2026-11-10 00:00:00", "2026-11-14 00:00:00"))
            copy[6] = rnd.choice((None, "2026-11-10 00:00:00", "2026-11-14 00:00:00"))
            rows.append(copy)
    rnd.shuffle(rows)
    return rows


def load(world, rows, rnd):
    i = 0
    while i < len(rows):
        n = rnd.randint(1, 12)
        world.append(rows[i : i + n])
        i += n


async def run_with_crashes(world, rnd, crashes):
    worker = world.worker()
    for _ in range(crashes):
        world.out.crash_after = rnd.randint(0, 40)
        try:
            await world.run(worker, every=rnd.randint(1, 6))
            return worker
        except Crash:
            world.out.crash_after = None
            # Taken over from the changelogs, or restarted on its own local copy.
            worker = world.worker(local=worker.stores if rnd.random() < 0.5 else None)
    world.out.crash_after = None
    await world.run(worker, every=rnd.randint(1, 6))
    return worker


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), messy=st.booleans(), crashes=st.integers(0, 4))
async def test_any_order_batching_and_crash_equals_the_spec(seed, messy, crashes):
    rnd = random.Random(seed)
    data = generate(50, seed=seed, buyers=8)
    rows = rows_of(data, rnd, messy)
    world = World()
    load(world, rows, rnd)
    await run_with_crashes(world, rnd, crashes)
    assert world.sink.rows() == spec_oracle(rows)
    if not messy:  # copies that differ only in gmt_modified: the seed's SQL itself
        assert world.sink.rows() == reference.evaluate(data.orders, data.refunds)


@pytest.mark.parametrize("crash_after", range(0, 30, 3))
async def test_a_checkpoint_cut_anywhere_in_its_changelog_neither_loses_nor_double_counts(
    crash_after,
):
    """Entries written, days not (or the reverse): without the rollback, a replay would see
    the entry as a duplicate and lose it, or count it again."""
    rnd = random.Random(crash_after)
    data = generate(40, seed=crash_after, buyers=3)
    rows = rows_of(data, rnd, messy=True)
    world = World()
    load(world, rows, rnd)
    worker = world.worker()
    await world.run(worker, every=4, upto=len(world.log) // 2)
    world.out.crash_after = crash_after
    with pytest.raises(Crash):
        await world.run(worker, every=10**6)
    world.out.crash_after = None
    await world.run(world.worker(), every=3)
    assert world.sink.rows() == spec_oracle(rows)


async def test_a_hot_buyer_costs_one_entry_and_one_day_per_record():
    """No value grows with a buyer's history: each record writes its entry and its day."""
    world = World()
    rows = [
        [1, f"o{i}", "2", 20261111, 1, "2026-11-11 00:00:00", f"2026-11-11 00:{i % 60:02d}:00"]
        for i in range(5000)
    ]
    load(world, rows, random.Random(1))
    worker = world.worker()
    await world.run(worker, every=50)
    sizes = [len(v) for log in world.out.logs.values() for _, v in log if v is not None]
    assert max(sizes) < 200
    assert world.sink.table[(1, 20261111)].cumulate_amount == 5000


async def test_an_old_format_partition_is_refused(tmp_path):
    from coupon_stream.pipeline.state_stage import StateFormatError

    world = World()
    world.append([r()])
    worker = world.worker()
    worker.stores["days"].write(0, {b"~format": b"1"})
    with pytest.raises(StateFormatError, match="format 1.*COUPON_APP_ID"):
        await world.run(worker, every=1)


def test_dataset_has_the_interesting_cases():
    data = generate(2000, seed=3)
    rows = reference.evaluate(data.orders, data.refunds)
    orders = {(o["biz_order_id"], o["pay_status"]) for o in data.orders}
    assert len(data.orders) > len(orders)  # re-sent copies
    assert any(r["refund_fee"] < 0 for r in data.refunds)
    keys = {(int(o["buyer_id"]), int(o["pay_time"][:10].replace("-", ""))) for o in data.orders}
    assert len(keys) > len(rows) > 0
    assert orjson.loads(next(jsonl(data.orders)))["buyer_id"]


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


def test_the_fast_read_of_a_record_is_as_of():
    for rec in (Record(1, 10, ["n"], ["o"]), Record(2, 3, None, ["o"])):
        for committed, session in ((10, 2), (4, 2), (4, 1), (2, 5)):
            assert Record.read(rec.encode(), committed, session) == rec.as_of(committed, session)
