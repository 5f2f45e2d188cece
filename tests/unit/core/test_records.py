import math

import orjson
import pytest

from coupon_stream.core.records import (
    BadRecord,
    Source,
    parse_record,
    partition_for_buyer,
)


def order(**over):
    base = {
        "biz_order_id": "o1",
        "pay_status": "2",
        "buyer_id": "42",
        "pay_time": "2026-11-11 10:00:00",
        "gmt_create": "2026-11-11 09:59:00",
        "gmt_modified": "2026-11-11 10:00:01",
        "auction_title": 'a "title", with\ttabs\nand 双十一',
        "div_idx_actual_total_fee": 12399,
    }
    base.update(over)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_valid_order_fields():
    r = parse_record(order(), Source.ORDERS)
    assert (r.biz_order_id, r.pay_status, r.buyer_id) == ("o1", "2", 42)
    assert r.effect_time == 20261111
    assert r.yuan == 123


@pytest.mark.parametrize(
    ("amount", "yuan"),
    [(12399, 123), (-12399, -123), (99, 0), (-99, 0), (-100, -1), (12399.99, 123), (0, 0)],
)
def test_truncation_toward_zero(amount, yuan):
    raw = orjson.dumps(
        {
            "biz_order_id": "o",
            "pay_status": "4",
            "buyer_id": 1,
            "pay_time": "2026-11-11 00:00:00",
            "refund_fee": amount,
        }
    )
    assert parse_record(raw, Source.REFUNDS).yuan == yuan
    assert yuan == math.trunc(amount / 100)


def test_refund_uses_refund_fee_not_order_field():
    raw = orjson.dumps(
        {
            "biz_order_id": "o",
            "pay_status": "4",
            "buyer_id": "1",
            "pay_time": "2026-11-11 00:00:00",
            "div_idx_actual_total_fee": 5,
        }
    )
    with pytest.raises(BadRecord, match="refund_fee"):
        parse_record(raw, Source.REFUNDS)


def test_optional_fields_may_be_absent_or_null():
    r = parse_record(order(gmt_create=None, gmt_modified=..., auction_title=...), Source.ORDERS)
    assert r.gmt_create is None and r.gmt_modified is None


@pytest.mark.parametrize(
    ("raw", "reason", "kind"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON", "json"),
        (b"not json", "not valid UTF-8 JSON", "json"),
        (b"[1, 2]", "not a JSON object but a JSON list", "not_object"),
        (None, "empty message", "json"),
        (order(buyer_id=...), "missing or null: buyer_id", "missing"),
        (order(pay_status=None), "missing or null: pay_status", "missing"),
        (order(div_idx_actual_total_fee=None), "div_idx_actual_total_fee", "missing"),
        (order(buyer_id="abc"), "buyer_id is not an integer", "buyer_id"),
        (order(buyer_id="9223372036854775808"), "does not fit a signed 64-bit", "buyer_id"),
        (order(buyer_id=1.5), "buyer_id must be an integer", "buyer_id"),
        (order(buyer_id=True), "buyer_id must be an integer", "buyer_id"),
        (order(pay_time="2026-02-30 10:00:00"), "pay_time", "pay_time"),
        (order(pay_time="2026-11-11T10:00:00"), "yyyy-MM-dd HH:mm:ss", "pay_time"),
        (order(pay_time="2026-11-11 25:00:00"), "pay_time", "pay_time"),
        (order(div_idx_actual_total_fee="12399"), "must be a JSON number", "amount"),
        (order(div_idx_actual_total_fee=1e300), "does not fit a BIGINT", "amount"),
        (order().replace(b"12399", b"1" + b"0" * 400), "infinity", "json"),
        (order().replace(b"12399", b"1" + b"0" * 30), "does not fit a BIGINT", "amount"),
        (order(biz_order_id=17), "biz_order_id", "biz_order_id"),
        (order(gmt_modified="x" * 256), "gmt_modified", "gmt_modified"),
    ],
)
def test_bad_records_have_readable_reasons(raw, reason, kind):
    with pytest.raises(BadRecord) as info:
        parse_record(raw, Source.ORDERS)
    assert reason in info.value.reason
    assert info.value.kind == kind


@pytest.mark.parametrize("text", [b'{"a": NaN}', b'{"a": Infinity}'])
def test_non_finite_json_literals_are_rejected(text):
    with pytest.raises(BadRecord):
        parse_record(text, Source.ORDERS)


def test_int64_edges_accepted():
    assert parse_record(order(buyer_id="-9223372036854775808"), Source.ORDERS).buyer_id == -(2**63)
    assert parse_record(order(buyer_id=2**63 - 1), Source.ORDERS).buyer_id == 2**63 - 1


def test_partition_for_buyer_is_stable_and_in_range():
    parts = {partition_for_buyer(b, 8) for b in range(1000)}
    assert parts == set(range(8))
    assert partition_for_buyer(123456789, 8) == partition_for_buyer(123456789, 8)


def test_partition_for_buyer_golden_values():
    """Changing this function silently moves every buyer away from its state."""
    from coupon_stream.core.records import partition_for_buyer

    buyers = (0, 1, 7, 10_000_000, -5, 2**63 - 1)
    assert [partition_for_buyer(b, 8) for b in buyers] == [1, 7, 2, 5, 3, 6]
    assert [partition_for_buyer(b, 6) for b in buyers] == [5, 5, 0, 1, 1, 4]


def test_the_one_encoder_writes_what_orjson_wrote():
    """State written by earlier versions (orjson) must read and key the same."""
    from coupon_stream.core.records import encode_json

    texts = ["", "plain", 'quote " backslash \\', "\t\n\r\b\f", "双十一 🎉", "\x00\x1f\x7f\u2028"]
    texts += [chr(c) for c in range(0, 0x800)]
    for text in texts:
        value = [1, -(2**63), 2**63 - 1, None, text, (text, text)]
        assert encode_json(value) == orjson.dumps(value)
