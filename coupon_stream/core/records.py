"""Pure record logic for the intake step: parse, validate, key and truncate (no I/O).

docs/semantics.md ("Input", "Bad input") defines what is valid; everything here is a
function of the message bytes and its source topic, so it is tested on its own.
"""

from __future__ import annotations

import math
import re
import zlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final

import msgspec
import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# MySQL VARCHAR columns of the result table; a longer timestamp could never be written.
MAX_TIMESTAMP_CHARS = 255
_PAY_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_INTEGER = re.compile(r"[+-]?\d+")


class Source(StrEnum):
    """Which seed table a message comes from; decides the amount field's name."""

    ORDERS = "orders"
    REFUNDS = "refunds"


AMOUNT_FIELD = {Source.ORDERS: "div_idx_actual_total_fee", Source.REFUNDS: "refund_fee"}


class BadRecord(ValueError):
    """A message that cannot be counted; `reason` is what the dead letter says."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a short fixed label for metrics: json, not_object, missing, <field>


def _buyer_id(value: Any) -> int:
    # The seed declares buyer_id VARCHAR and casts it to BIGINT; a JSON integer is accepted too.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be an integer or a string holding one")
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
            raise ValueError("is not an integer")
        value = int(value)
    number: int = value
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError("does not fit a signed 64-bit BIGINT")
    return number


def _amount(value: Any) -> float:
    # A DOUBLE column: JSON numbers only (no strings, no booleans), finite after conversion.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("does not fit a DOUBLE") from None
    if not math.isfinite(number):
        raise ValueError("must be finite")
    if not INT64_MIN <= math.trunc(number / 100) <= INT64_MAX:
        raise ValueError("amount / 100 does not fit a BIGINT")
    return number


class PaymentRecord(BaseModel):
    """One order or refund as the seed's merged view sees it (amount already unified)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    biz_order_id: StrictStr
    pay_status: StrictStr
    buyer_id: Annotated[int, BeforeValidator(_buyer_id)]
    pay_time: StrictStr
    amount: Annotated[float, BeforeValidator(_amount)]
    gmt_create: StrictStr | None = Field(None, max_length=MAX_TIMESTAMP_CHARS)
    gmt_modified: StrictStr | None = Field(None, max_length=MAX_TIMESTAMP_CHARS)

    @field_validator("pay_time")
    @classmethod
    def _pay_time(cls, value: str) -> str:
        if not _PAY_TIME.fullmatch(value):
            raise ValueError("must be of the form yyyy-MM-dd HH:mm:ss")
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")  # raises on a date that does not exist
        return value

    @property
    def effect_time(self) -> int:
        """The seed's `date_format(pay_time, ..., 'yyyyMMdd')` as a BIGINT."""
        p = self.pay_time
        return int(p[0:4] + p[5:7] + p[8:10])

    @property
    def yuan(self) -> int:
        """`CAST(amount / 100 AS BIGINT)`: Java truncates toward zero, Python's // would floor."""
        return math.trunc(self.amount / 100)


def _reason(error: ValidationError, amount_field: str) -> str:
    parts = []
    for item in error.errors(include_url=False):
        field = ".".join(str(p) for p in item["loc"]) or "record"
        if field == "amount":
            field = amount_field
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is missing"
        parts.append(f"{field} {message}" if field != "record" else message)
    return "; ".join(parts)


_REQUIRED = ("biz_order_id", "pay_status", "buyer_id", "pay_time")


def parse_record(raw: bytes | None, source: Source) -> PaymentRecord:
    """Validate one message; raise `BadRecord` with a readable reason if it cannot count."""
    return _validate(_decode(raw), source)


def _decode(raw: bytes | None) -> Any:
    if raw is None:
        raise BadRecord("empty message (no value)", "json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not valid UTF-8 JSON: {exc}", "json") from None


def _validate(data: Any, source: Source) -> PaymentRecord:
    if not isinstance(data, dict):
        raise BadRecord(f"not a JSON object but a JSON {type(data).__name__}", "not_object")
    amount_field = AMOUNT_FIELD[source]
    missing = [name for name in (*_REQUIRED, amount_field) if data.get(name) is None]
    if missing:
        raise BadRecord("missing or null: " + ", ".join(missing), "missing")
    data["amount"] = data[amount_field]
    try:
        return PaymentRecord.model_validate(data)
    except ValidationError as exc:
        first = str(exc.errors()[0]["loc"][0]) if exc.errors() else "record"
        kind = "amount" if first == "amount" else first
        raise BadRecord(_reason(exc, amount_field), kind) from None


def partition_for_buyer(buyer_id: int, partitions: int) -> int:
    """Stable buyer -> partition map, so a buyer's state always lives in one partition."""
    return zlib.crc32(b"%d" % buyer_id) % partitions


# -- the hot path ---------------------------------------------------------------------------
#
# pydantic alone would cost about a record's whole budget, and so would decoding the whole
# object and checking it by hand (docs/performance.md, "History"). Almost every message is
# plainly valid, so `read_row` decodes only the fields it needs, with their JSON types
# checked in C by msgspec (other fields are skipped unread), checks the rest by hand,
# and lets `parse_record` (the authority, with its readable reasons) decide everything
# else. The fast check only ever accepts: a record it is unsure of goes to
# pydantic. A property test holds the two to the same answers.

Row = tuple[int, str, str, int, int, str | None, str | None]
"""(buyer_id, biz_order_id, pay_status, effect_time, yuan, gmt_create, gmt_modified): what a
by-buyer message carries for one valid record, and all the state stage needs of it."""

# Positions in a Row, Final so that indexing a Row with them keeps each field's type.
BUYER: Final = 0
ORDER: Final = 1
STATUS: Final = 2
ROW_DAY: Final = 3
ROW_YUAN: Final = 4
ROW_CREATED: Final = 5
ROW_MODIFIED: Final = 6


encode_json = msgspec.json.Encoder().encode
"""The JSON encoder of everything a worker writes per record (rows, state keys and values).

Byte for byte what orjson writes for the same values (a test holds it to that: state keys
written before must still match). orjson starts every output in a 1 KiB buffer from the C
heap, which for the small values written here cost more than encoding them
(docs/performance.md, "Latest results").
"""


def encode_rows(rows: list[Row]) -> bytes:
    """The by-buyer wire format: a JSON array of rows, all of one partition."""
    return encode_json(rows)


def decode_rows(raw: bytes) -> list[Row]:
    rows: list[Row] = orjson.loads(raw)
    return rows


_Timestamp = Annotated[str, msgspec.Meta(max_length=MAX_TIMESTAMP_CHARS)]
_MAX_EXACT = 10**15  # |amount| below this converts to float exactly, and /100 fits a BIGINT


class _PlainOrder(msgspec.Struct, gc=False):
    """The fields a row needs, with the JSON types and bounds a plainly valid record has.

    Types, lengths and ranges are checked in C while decoding; what msgspec's constraints
    would check more slowly than Python (the digits of a buyer id, the time of day) is left
    to `_fast_row`.
    """

    biz_order_id: str
    pay_status: str
    buyer_id: (
        Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
        | Annotated[str, msgspec.Meta(min_length=1, max_length=18)]
    )
    pay_time: Annotated[str, msgspec.Meta(min_length=19, max_length=19)]
    amount: Annotated[float, msgspec.Meta(gt=-_MAX_EXACT, lt=_MAX_EXACT)] = msgspec.field(
        name="div_idx_actual_total_fee"
    )
    gmt_create: _Timestamp | None = None
    gmt_modified: _Timestamp | None = None


class _PlainRefund(_PlainOrder, gc=False):
    amount: Annotated[float, msgspec.Meta(gt=-_MAX_EXACT, lt=_MAX_EXACT)] = msgspec.field(
        name="refund_fee"
    )


_PLAIN: dict[Source, msgspec.json.Decoder[_PlainOrder]] = {
    Source.ORDERS: msgspec.json.Decoder(_PlainOrder),
    Source.REFUNDS: msgspec.json.Decoder(_PlainRefund),
}
_TIME_OF_DAY = re.compile(r" (?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DAYS: dict[str, int | None] = {}  # "yyyy-MM-dd" -> yyyyMMdd, or None if no such day
_MAX_CACHED_DAYS = 100_000


def _day(text: str) -> int | None:
    day = _DAYS.get(text, -1)
    if day != -1:
        return day
    try:
        datetime.strptime(text, "%Y-%m-%d")
        day = int(text[0:4] + text[5:7] + text[8:10]) if _DATE.fullmatch(text) else None
    except ValueError:
        day = None
    if len(_DAYS) < _MAX_CACHED_DAYS:
        _DAYS[text] = day
    return day


def _fast_row(plain: _PlainOrder) -> Row | None:
    """The row of a plainly valid record, or None if pydantic must look at it."""
    buyer_id = plain.buyer_id
    if isinstance(buyer_id, str):
        if not (buyer_id.isascii() and buyer_id.isdigit()):
            return None
        buyer = int(buyer_id)
    else:
        buyer = buyer_id
    pay_time = plain.pay_time
    if not _TIME_OF_DAY.fullmatch(pay_time, 10):
        return None
    day = _day(pay_time[:10])
    if day is None:
        return None
    return (
        buyer,
        plain.biz_order_id,
        plain.pay_status,
        day,
        math.trunc(plain.amount / 100),
        plain.gmt_create,
        plain.gmt_modified,
    )


def read_row(raw: bytes | None, source: Source) -> Row:
    """Validate one message into the row the state stage keeps; `BadRecord` if it cannot count."""
    if raw is not None:
        try:
            row = _fast_row(_PLAIN[source].decode(raw))
        except msgspec.DecodeError:
            row = None
        if row is not None:
            return row
    return row_of(parse_record(raw, source))


def row_of(record: PaymentRecord) -> Row:
    return (
        record.buyer_id,
        record.biz_order_id,
        record.pay_status,
        record.effect_time,
        record.yuan,
        record.gmt_create,
        record.gmt_modified,
    )
