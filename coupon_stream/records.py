"""Pure record logic for the intake step: parse, validate, key and truncate (no I/O).

SPEC.md "Input" and "Bad input" define what is valid; everything here is a function of the
message bytes and its source topic, so it is tested on its own.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

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
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("does not fit a signed 64-bit BIGINT")
    return value


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
    if raw is None:
        raise BadRecord("empty message (no value)", "json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not valid UTF-8 JSON: {exc}", "json") from None
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


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one kept (order, pay_status) record adds to its buyer's day: the dedup entry."""

    biz_order_id: str
    pay_status: str
    effect_time: int
    yuan: int
    gmt_create: str | None
    gmt_modified: str | None

    @property
    def dedup_key(self) -> tuple[str, str]:
        return (self.biz_order_id, self.pay_status)

    def generated_before(self, other: Contribution) -> bool:
        """True if this copy was generated strictly earlier than `other` (SPEC step 2).

        A null gmt_modified sorts after every timestamp, so the copy SQL's MIN picks wins;
        ties keep the copy that arrived first.
        """
        if self.gmt_modified is None:
            return False
        return other.gmt_modified is None or self.gmt_modified < other.gmt_modified


def contribution_of(record: PaymentRecord) -> Contribution:
    return Contribution(
        record.biz_order_id,
        record.pay_status,
        record.effect_time,
        record.yuan,
        record.gmt_create,
        record.gmt_modified,
    )


def partition_for_buyer(buyer_id: int, partitions: int) -> int:
    """Stable buyer -> partition map, so a buyer's state always lives in one partition."""
    return zlib.crc32(str(buyer_id).encode()) % partitions
