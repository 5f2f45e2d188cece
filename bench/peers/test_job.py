"""The Pathway peer of `make bench-peers` (bench/peers/pathway_job.py) computes the seed's
table: its `tddl_output` over generated and hand-made input equals the seed SQL evaluated in
SQLite (tests/reference.py).

Pathway is not one of the project's dependencies: `make bench-peers` installs it (the
`peers` extra) and runs these tests before it measures; `make test` does not collect
them. The job runs in a child process, so that Pathway's engine and its global graph stay
out of the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coupon_stream.tools.dataset import Dataset, Skew, generate, write
from tests.reference import evaluate

ROOT = Path(__file__).resolve().parents[2]


RUN = """
import json, sys
from bench.peers.pathway_job import from_files
print("ROWS " + json.dumps(from_files(sys.argv[1], sys.argv[2])))
"""


def pathway_table(dataset: Dataset, tmp_path: Path) -> set[tuple[Any, ...]]:
    orders, refunds = write(dataset, tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(orders), str(refunds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))
    return {tuple(row) for row in json.loads(line.removeprefix("ROWS "))}


def _record(order_id: str, buyer: int, fee: float, **fields: Any) -> dict[str, Any]:
    return {
        "biz_order_id": order_id,
        "buyer_id": str(buyer),
        "pay_time": "2026-11-11 10:00:00",
        "gmt_create": "2026-11-11 09:59:00",
        "gmt_modified": "2026-11-11 10:00:05",
        "pay_status": "2",
        "div_idx_actual_total_fee": fee,
        **fields,
    }


def _refund(order: dict[str, Any], fee: float, **fields: Any) -> dict[str, Any]:
    refund = {k: v for k, v in order.items() if k != "div_idx_actual_total_fee"}
    return {**refund, "pay_status": "4", "refund_fee": fee, **fields}


@pytest.mark.parametrize("skew", ["zipf", "uniform", "hot"])
def test_pathway_job_equals_the_seed_sql_on_generated_input(tmp_path: Path, skew: Skew) -> None:
    """Re-sent copies (some before their original), refunds, days ending at or below 0."""
    dataset = generate(3_000, seed=11, skew=skew)
    expected = evaluate(dataset.orders, dataset.refunds)
    assert len(expected) > 500
    assert pathway_table(dataset, tmp_path) == expected


def test_pathway_job_equals_the_seed_sql_on_the_edge_cases(tmp_path: Path) -> None:
    cancelled = _record("o1", 1, 12399, gmt_create=None)  # 123, refunded to 0: no row
    partly = _record("o2", 2, 12399.5, gmt_create="2026-11-11 00:00:01")
    small = _record("o3", 2, 50, gmt_create=None)  # trunc(0.5) = 0; MIN skips its null
    no_create = _record("o4", 3, 20_000, gmt_create=None)  # every gmt_create null: null
    late_first = _record("o5", 4, 30_000, gmt_modified="2026-11-11 10:00:09")
    late_earlier = _record("o5", 4, 30_000, gmt_modified="2026-11-11 10:00:01")  # kept
    null_modified = _record("o6", 6, 10_000, gmt_modified=None)  # null sorts last
    overdrawn = _record("o7", 5, 10_000)
    dataset = Dataset(
        orders=[
            cancelled,
            {**cancelled, "gmt_modified": "2026-11-11 10:09:00"},
            partly,
            small,
            no_create,
            late_first,
            late_earlier,
            null_modified,
            {**null_modified, "gmt_modified": "2026-11-11 10:00:02"},
            overdrawn,
            _record("o8", 7, 1_000, pay_time="2026-11-12 23:59:59"),
        ],
        refunds=[
            _refund(cancelled, -12399, gmt_modified="2026-11-11 11:00:00"),
            _refund(partly, -100.75),  # -1 yuan, truncated toward zero
            _refund(overdrawn, -12_000),  # the day ends below 0: no row
        ],
    )
    expected = evaluate(dataset.orders, dataset.refunds)
    assert {(r[2], r[4]) for r in expected} == {
        (2, 20261111),
        (3, 20261111),
        (4, 20261111),
        (6, 20261111),
        (7, 20261112),
    }
    assert pathway_table(dataset, tmp_path) == expected
