"""Property tests: whatever arrives, parsing either yields a valid record or a BadRecord."""

from __future__ import annotations

import json
import math
from datetime import datetime

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from coupon_stream.core import records as records_module
from coupon_stream.core.records import BadRecord, Source, parse_record, read_row, row_of

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


def authority(raw: bytes, source: Source) -> tuple[object, ...] | str:
    try:
        return row_of(parse_record(raw, source))
    except BadRecord as bad:
        return bad.reason


def hot_path(raw: bytes, source: Source) -> tuple[object, ...] | str:
    try:
        return read_row(raw, source)
    except BadRecord as bad:
        return bad.reason


plausible = st.fixed_dictionaries(
    {
        "biz_order_id": st.text(max_size=8) | st.integers(),
        "pay_status": st.sampled_from(["2", "4", ""]) | st.none(),
        "buyer_id": st.integers(-(2**64), 2**64)
        | st.from_regex(r"[+-]?[0-9٣]{1,21}", fullmatch=True)
        | st.booleans(),
        "pay_time": st.from_regex(
            r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", fullmatch=True
        )
        | st.sampled_from(["2024-02-29 23:59:59", "2026-02-29 10:00:00", "2026-11-11 24:00:00"]),
        "div_idx_actual_total_fee": st.integers(-(2**64), 2**64)
        | st.floats()
        | st.sampled_from([-199.99, 10**15, -(10**15), 1e300]),
        "refund_fee": st.floats(-1e6, 1e6) | st.text(max_size=3),
        "gmt_create": st.none() | st.text(max_size=3) | st.text(min_size=254, max_size=257),
        "gmt_modified": st.none() | st.integers() | st.text(max_size=3),
    }
)


@settings(max_examples=1500, deadline=None)
@given(plausible | records, st.sampled_from(Source))
def test_hot_path_agrees_with_pydantic(data, source):
    """`read_row` checks common records by hand; it must give pydantic's answer every time."""
    try:
        raw = json.dumps(data, allow_nan=False).encode()
    except ValueError:
        raw = json.dumps(data).encode()  # NaN and Infinity: not JSON, both paths must refuse
    assert hot_path(raw, source) == authority(raw, source)


def test_hot_path_skips_pydantic_for_a_plain_record(monkeypatch):
    def refuse(data, source):
        raise AssertionError("pydantic was asked")

    monkeypatch.setattr(records_module, "_validate", refuse)
    raw = orjson.dumps(
        {
            "biz_order_id": "o1",
            "pay_status": "2",
            "buyer_id": "42",
            "pay_time": "2026-11-11 10:00:00",
            "gmt_create": None,
            "gmt_modified": "2026-11-11 10:00:01",
            "refund_fee": -12399.5,
        }
    )
    assert read_row(raw, Source.REFUNDS) == (
        42,
        "o1",
        "2",
        20261111,
        -123,
        None,
        "2026-11-11 10:00:01",
    )
