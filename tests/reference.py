"""Independent evaluation of the seed's Flink SQL over a batch of input, in SQLite.

The statements below are the seed's, nearly verbatim (connector WITH clauses dropped, types
mapped to SQLite's); `date_format` is registered as a function with the seed's Java patterns.
Nothing here imports the service's code: it is the yardstick the service is measured by.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from coupon_stream.core.grants import Policy

COLUMNS = (
    "biz_order_id",
    "auction_id",
    "auction_title",
    "buyer_id",
    "buyer_nick",
    "pay_time",
    "gmt_create",
    "gmt_modified",
    "biz_type",
    "pay_status",
    "attributes",
    "from_group",
)

SEED_SQL = """
CREATE TABLE dwd_tb_trd_pay_ri(
        biz_order_id    VARCHAR, auction_id VARCHAR, auction_title VARCHAR, buyer_id VARCHAR,
        buyer_nick VARCHAR, pay_time VARCHAR, gmt_create VARCHAR, gmt_modified VARCHAR,
        biz_type VARCHAR, pay_status VARCHAR, `attributes` VARCHAR, from_group VARCHAR,
        div_idx_actual_total_fee DOUBLE);
CREATE TABLE dwd_tb_trd_rfd_ri(
        biz_order_id    VARCHAR, auction_id VARCHAR, auction_title VARCHAR, buyer_id VARCHAR,
        buyer_nick VARCHAR, pay_time VARCHAR, gmt_create VARCHAR, gmt_modified VARCHAR,
        biz_type VARCHAR, pay_status VARCHAR, `attributes` VARCHAR, from_group VARCHAR,
        refund_fee DOUBLE);
CREATE VIEW  dwd_tb_trd_and_rfd_pay_ri
AS
SELECT
*
FROM(
    SELECT
        `a`.biz_order_id biz_order_id, `a`.auction_id auction_id,
        `a`.auction_title auction_title, `a`.buyer_id buyer_id, `a`.buyer_nick buyer_nick,
        `a`.pay_time pay_time, `a`.gmt_create gmt_create, `a`.gmt_modified gmt_modified,
        `a`.biz_type biz_type, `a`.pay_status pay_status, `a`.`attributes` `attributes`,
        `a`.from_group, `a`.div_idx_actual_total_fee div_idx_actual_total_fee
    FROM dwd_tb_trd_pay_ri `a`
    UNION ALL
    SELECT
        `b`.biz_order_id biz_order_id, `b`.auction_id auction_id,
        `b`.auction_title auction_title, `b`.buyer_id buyer_id, `b`.buyer_nick buyer_nick,
        `b`.pay_time pay_time, `b`.gmt_create gmt_create, `b`.gmt_modified gmt_modified,
        `b`.biz_type biz_type, `b`.pay_status pay_status, `b`.`attributes` `attributes`,
        `b`.from_group, `b`.refund_fee div_idx_actual_total_fee
    FROM dwd_tb_trd_rfd_ri `b`
);
CREATE VIEW filter_hxhb_dwd_tb_trd_and_rfd_pay_ri_distinct AS
SELECT
   biz_order_id biz_order_id,
   pay_status pay_status,
   MIN(auction_id) auction_id,
   MIN(auction_title) auction_title,
   MIN(buyer_id) buyer_id,
   MIN(buyer_nick)  buyer_nick,
   MIN(pay_time)  pay_time,
   MIN(gmt_create)  gmt_create,
   MIN(gmt_modified)  gmt_modified,
   MIN(biz_type)  biz_type,
   MIN(attributes)  attributes,
   MIN(div_idx_actual_total_fee)  div_idx_actual_total_fee
FROM
    dwd_tb_trd_and_rfd_pay_ri
GROUP BY biz_order_id ,pay_status;
CREATE VIEW ads_tb_trd_and_rfd_pay_ri AS
SELECT
   MIN(gmt_create) gmt_create,
   MAX(gmt_modified) gmt_modified,
   CAST (buyer_id AS BIGINT) buyer_id,
   CAST (date_format(pay_time , 'yyyy-MM-dd HH:mm:ss' , 'yyyyMMdd') AS BIGINT) as effect_time,
   SUM(CAST(div_idx_actual_total_fee/100 AS BIGINT)) cumulate_amount
FROM
   filter_hxhb_dwd_tb_trd_and_rfd_pay_ri_distinct
GROUP BY
   buyer_id,date_format(pay_time , 'yyyy-MM-dd HH:mm:ss' , 'yyyyMMdd');
"""

INSERT_INTO_TDDL_OUTPUT = """
SELECT
    gmt_create,
    gmt_modified,
    buyer_id,
    cumulate_amount,
    effect_time
from ads_tb_trd_and_rfd_pay_ri
where cumulate_amount>0
"""

_JAVA_TO_PY = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}


def _java_pattern(pattern: str) -> str:
    for java, py in _JAVA_TO_PY.items():
        pattern = pattern.replace(java, py)
    return pattern


def date_format(value: str | None, source: str, target: str) -> str | None:
    if value is None:
        return None
    return datetime.strptime(value, _java_pattern(source)).strftime(_java_pattern(target))


Row = tuple[str | None, str | None, int, int, int]


def evaluate(orders: Iterable[dict[str, Any]], refunds: Iterable[dict[str, Any]]) -> set[Row]:
    """The rows the seed job's `tddl_output` holds after all of this input."""
    db = sqlite3.connect(":memory:")
    db.create_function("date_format", 3, date_format, deterministic=True)
    db.executescript(SEED_SQL)
    for table, amount, records in (
        ("dwd_tb_trd_pay_ri", "div_idx_actual_total_fee", orders),
        ("dwd_tb_trd_rfd_ri", "refund_fee", refunds),
    ):
        names = (*COLUMNS, amount)
        db.executemany(
            f"INSERT INTO {table} ({', '.join(f'`{n}`' for n in names)}) "
            f"VALUES ({', '.join('?' * len(names))})",
            [(*(_text(r.get(c)) for c in COLUMNS), float(r[amount])) for r in records],
        )
    return {tuple(row) for row in db.execute(INSERT_INTO_TDDL_OUTPUT)}


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def main() -> None:
    """`python -m tests.reference ORDERS.jsonl REFUNDS.jsonl RESULT.db [TABLE]`: compare.

    Used by `make demo` to show that the table it printed is the seed SQL's answer.
    """
    import json
    import sys

    orders_path, refunds_path, db_path, *rest = sys.argv[1:]
    table = rest[0] if rest else "tddl_output"

    def load(path: str) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    expected = evaluate(load(orders_path), load(refunds_path))
    with sqlite3.connect(db_path) as db:
        actual = set(
            db.execute(
                "SELECT gmt_create, gmt_modified, buyer_id, cumulate_amount, effect_time "
                f"FROM {table}"
            )
        )
    same = actual == expected
    print(
        f"seed SQL evaluated independently in SQLite: {len(expected)} rows; "
        f"service table: {len(actual)} rows; identical: {'yes' if same else 'NO'}"
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()


def policy_applied(
    policy: Policy, rows: set[tuple[Any, ...]]
) -> dict[tuple[int, int], tuple[int, int, int]]:
    """The grants table a result table must come with: (buyer, day) -> tier, coupon, version."""
    granted = {(buyer, day): policy.granted(total) for _, _, buyer, total, day in rows}
    return {key: row for key, row in granted.items() if row is not None}
