import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.dataset import generate, jsonl
from coupon_stream.records import Contribution, Source, read_row
from coupon_stream.state import (
    BuyerState,
    Outcome,
    ResultRow,
    apply_batch,
    decode_batch,
    encode_batch,
    generated_before,
)
from tests import reference


def c(
    order="o1",
    status="2",
    day=20261111,
    yuan=10,
    gc="2026-11-11 00:00:00",
    gm="2026-11-11 00:00:05",
):
    return Contribution(order, status, day, yuan, gc, gm)


def test_first_generated_copy_wins_whatever_the_arrival_order():
    late, early = c(gm="2026-11-11 00:10:00"), c(gm="2026-11-11 00:00:05")
    s = BuyerState(7)
    assert s.apply(late) is Outcome.NEW
    assert s.apply(early) is Outcome.REPLACED
    assert s.apply(late) is Outcome.DUPLICATE
    assert s.row(20261111) == ResultRow(
        "2026-11-11 00:00:00", "2026-11-11 00:00:05", 7, 10, 20261111
    )


def test_day_sum_min_create_max_modified_and_delete_at_zero():
    s = BuyerState(7)
    s.apply(c("o1", yuan=123, gc="2026-11-11 00:00:09", gm="2026-11-11 00:00:10"))
    s.apply(c("o2", yuan=50, gc=None, gm="2026-11-11 00:00:20"))
    s.apply(c("o3", day=20261112, yuan=99))
    assert s.row(20261111) == ResultRow(
        "2026-11-11 00:00:09", "2026-11-11 00:00:20", 7, 173, 20261111
    )
    s.apply(c("o1", status="4", yuan=-123, gc="2026-11-11 01:00:00", gm="2026-11-11 01:00:00"))
    assert s.row(20261111).cumulate_amount == 50
    s.apply(c("o2", status="4", yuan=-50, gm="2026-11-11 02:00:00"))
    assert s.row(20261111) is None  # total 0: the row is deleted
    s.apply(c("o4", yuan=1))
    assert s.row(20261111).cumulate_amount == 1  # and comes back above zero
    assert s.row(20261112).cumulate_amount == 99


def test_state_and_batch_round_trip():
    s = BuyerState(-5)
    s.apply(c("o1", gc=None, gm=None))
    s.apply(c("o2", yuan=-3))
    decoded = BuyerState.decode(-5, s.encode())
    assert {k: Contribution(*v) for k, v in decoded.kept.items()} == s.kept
    items = [(1, c()), (2**63 - 1, c("x", gm=None))]
    assert [(b, Contribution(*e)) for b, e in decode_batch(encode_batch(items))] == items


def test_apply_batch_touches_duplicates_and_both_days_of_a_moved_record():
    store: dict[int, BuyerState] = {}
    first = apply_batch([(1, c(day=20261112, gm="2026-11-11 00:09:00"))], lambda b: BuyerState(b))
    store.update(first.states)
    second = apply_batch(
        [
            (1, c(day=20261111, gm="2026-11-11 00:01:00")),
            (1, c(day=20261111, gm="2026-11-11 00:05:00")),
        ],
        lambda b: BuyerState.decode(b, store[b].encode()),
    )
    assert set(second.rows) == {(1, 20261111), (1, 20261112)}
    assert second.rows[(1, 20261112)] is None
    assert second.rows[(1, 20261111)].cumulate_amount == 10
    assert second.outcomes[Outcome.REPLACED] == 1 and second.outcomes[Outcome.DUPLICATE] == 1


def run_pure(messages, batch_sizes):
    """The service's logic without Kafka: parse, route per buyer, apply in batches."""
    store: dict[int, bytes] = {}
    table: dict[tuple[int, int], ResultRow] = {}
    items = [(r[0], Contribution(*r[1:])) for r in (read_row(m, s) for s, m in messages)]
    i = 0
    sizes = iter(batch_sizes)
    while i < len(items):
        n = next(sizes, 50)
        result = apply_batch(items[i : i + n], lambda b: BuyerState.decode(b, store.get(b)))
        for b, state in result.states.items():
            store[b] = state.encode()
        for key, row in result.rows.items():
            if row is None:
                table.pop(key, None)
            else:
                table[key] = row
        i += n
    return {
        (r.gmt_create, r.gmt_modified, r.buyer_id, r.cumulate_amount, r.effect_time)
        for r in table.values()
    }


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shuffle=st.randoms(),
    sizes=st.lists(st.integers(1, 40), max_size=30),
)
def test_any_arrival_order_and_batching_equals_the_reference_sql(seed, shuffle, sizes):
    data = generate(60, seed=seed, buyers=12)
    messages = [(Source.ORDERS, m) for m in jsonl(data.orders)] + [
        (Source.REFUNDS, m) for m in jsonl(data.refunds)
    ]
    shuffle.shuffle(messages)
    assert run_pure(messages, sizes) == reference.evaluate(data.orders, data.refunds)


def test_generated_dataset_has_the_interesting_cases():
    data = generate(2000, seed=3)
    rows = reference.evaluate(data.orders, data.refunds)
    orders = {(o["biz_order_id"], o["pay_status"]) for o in data.orders}
    assert len(data.orders) > len(orders)  # re-sent copies
    assert any(r["refund_fee"] < 0 for r in data.refunds)
    # some buyer-days end at or below zero: present in input, absent from the result
    keys = {(int(o["buyer_id"]), int(o["pay_time"][:10].replace("-", ""))) for o in data.orders}
    assert len(keys) > len(rows) > 0
    assert generate(50, seed=9) == generate(50, seed=9)
    assert orjson.loads(next(jsonl(data.orders)))["buyer_id"]


def test_reference_truncates_per_record_before_summing():
    base = {
        "biz_order_id": "o1",
        "pay_status": "2",
        "buyer_id": "1",
        "pay_time": "2026-11-11 10:00:00",
    }
    orders = [
        {**base, "div_idx_actual_total_fee": 199.0},
        {**base, "biz_order_id": "o2", "div_idx_actual_total_fee": 199.0},
    ]
    refunds = [
        {**base, "pay_status": "4", "refund_fee": -12399.0},
        {**base, "biz_order_id": "o9", "pay_status": "4", "refund_fee": 12500.0},
    ]
    assert reference.evaluate(orders, refunds) == {(None, None, 1, 1 + 1 - 123 + 125, 20261111)}
    rnd = random.Random(1)
    assert run_pure(
        [(Source.ORDERS, orjson.dumps(o)) for o in orders]
        + [(Source.REFUNDS, orjson.dumps(r)) for r in refunds],
        [rnd.randint(1, 3)],
    ) == reference.evaluate(orders, refunds)


def test_retention_cutoff_crosses_months_and_leap_days():
    from coupon_stream.state import retention_cutoff

    assert retention_cutoff(20261104, 2) == 20261102
    assert retention_cutoff(20261201, 1) == 20261130
    assert retention_cutoff(20240301, 1) == 20240229
    assert retention_cutoff(20260101, 7) == 20251225


def test_generated_before_prefers_earlier_and_non_null():
    def e(gm):
        return ["o", "2", 20261111, 1, None, gm]

    assert generated_before(e("2026-01-01 00:00:00"), e("2026-01-01 00:00:01"))
    assert not generated_before(e("2026-01-01 00:00:01"), e("2026-01-01 00:00:00"))
    assert not generated_before(e("2026-01-01 00:00:00"), e("2026-01-01 00:00:00"))  # tie
    assert generated_before(e("2026-01-01 00:00:00"), e(None))
    assert not generated_before(e(None), e("2026-01-01 00:00:00"))
    assert not generated_before(e(None), e(None))
