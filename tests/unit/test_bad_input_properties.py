"""Property tests: whatever arrives, parsing either yields a valid record or a BadRecord."""

from __future__ import annotations

import json
import math
from datetime import datetime

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.records import BadRecord, Source, parse_record

FIELDS = (
    "biz_order_id",
    "pay_status",
    "buyer_id",
    "pay_time",
    "gmt_create",
    "gmt_modified",
    "div_idx_actual_total_fee",
    "refund_fee",
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
records = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values
    | st.sampled_from(
        ["2026-11-11 10:00:00", "2026-02-29 10:00:00", "2024-02-29 23:59:59", "42", "-7", "1e3"]
    ),
)


def check(raw: bytes, source: Source) -> None:
    try:
        r = parse_record(raw, source)
    except BadRecord as bad:
        assert bad.reason and bad.kind
        return
    assert -(2**63) <= r.buyer_id < 2**63
    assert math.isfinite(r.amount) and -(2**63) <= r.yuan < 2**63
    datetime.strptime(r.pay_time, "%Y-%m-%d %H:%M:%S")
    assert r.effect_time == int(r.pay_time[:10].replace("-", ""))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(Source))
def test_arbitrary_bytes_never_crash(raw, source):
    check(raw, source)


@settings(max_examples=600, deadline=None)
@given(records, st.sampled_from(Source))
def test_arbitrary_json_objects_are_valid_or_dead_lettered(record, source):
    check(json.dumps(record).encode(), source)  # stdlib: it writes integers of any size


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31), st.integers(0, 23))
def test_pay_time_accepted_exactly_when_the_date_exists(y, m, d, h):
    pay_time = f"{y:04d}-{m:02d}-{d:02d} {h:02d}:00:00"
    raw = orjson.dumps(
        {
            "biz_order_id": "o",
            "pay_status": "2",
            "buyer_id": 1,
            "pay_time": pay_time,
            "div_idx_actual_total_fee": 1.0,
        }
    )
    try:
        datetime(y, m, d, h)
        exists = True
    except ValueError:
        exists = False
    try:
        parse_record(raw, Source.ORDERS)
        assert exists
    except BadRecord:
        assert not exists
