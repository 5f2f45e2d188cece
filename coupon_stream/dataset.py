"""A deterministic demo dataset: orders and refunds with every case the service must handle.

Re-sent copies (identical but for a later gmt_modified, some placed before the original),
partial and full refunds, several days, totals that truncate to zero, and buyers whose day
ends at or below zero. Same `seed`, same files.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson

DAYS = (datetime(2026, 11, 11), datetime(2026, 11, 12), datetime(2026, 11, 13))
TITLES = (
    "Wireless mouse",
    'Tea set "Longjing", 6 cups',
    "Down jacket\twinter, size L",
    "双十一 限定礼盒",
    "Line one\nline two, with 'quotes'",
    "Émaillé pot — 2 L",
)
FMT = "%Y-%m-%d %H:%M:%S"


@dataclass
class Dataset:
    orders: list[dict]
    refunds: list[dict]


def _ts(t: datetime) -> str:
    return t.strftime(FMT)


def _copies(rng: random.Random, record: dict, share: float) -> list[dict]:
    """The record plus re-sent copies; a copy differs only in a later gmt_modified."""
    out = [record]
    if rng.random() < share:
        base = datetime.strptime(record["gmt_modified"], FMT)
        for k in range(rng.randint(1, 2)):
            copy = dict(record)
            copy["gmt_modified"] = _ts(base + timedelta(seconds=rng.randint(1, 600) * (k + 1)))
            out.append(copy)
    return out


def _shuffle_nearby(rng: random.Random, items: list[dict], window: int = 50) -> list[dict]:
    """Local shuffle: copies usually follow their original but sometimes come first."""
    keyed = [(i + rng.uniform(0, window), item) for i, item in enumerate(items)]
    keyed.sort(key=lambda pair: pair[0])
    return [item for _, item in keyed]


def generate(orders: int, seed: int = 7, buyers: int | None = None) -> Dataset:
    rng = random.Random(seed)
    n_buyers = buyers or max(1, orders // 4)
    order_rows: list[dict] = []
    refund_rows: list[dict] = []
    for i in range(orders):
        buyer = str(10_000_000 + rng.randrange(n_buyers))
        day = rng.choice(DAYS)
        pay_time = day + timedelta(seconds=rng.randrange(86_400))
        created = pay_time - timedelta(seconds=rng.randint(0, 900))
        fee = rng.choice((rng.randint(1, 99), rng.randint(100, 50_000), rng.randint(100, 50_000)))
        if rng.random() < 0.3:
            fee += 0.5  # a DOUBLE that is not a whole number of cents still truncates
        order = {
            "biz_order_id": f"o{seed}-{i}",
            "auction_id": f"a{rng.randrange(1000)}",
            "auction_title": rng.choice(TITLES),
            "buyer_id": buyer,
            "buyer_nick": f"nick-{buyer}",
            "pay_time": _ts(pay_time),
            "gmt_create": _ts(created) if rng.random() > 0.02 else None,
            "gmt_modified": _ts(pay_time + timedelta(seconds=rng.randint(0, 60))),
            "biz_type": "200",
            "pay_status": "2",
            "attributes": "",
            "from_group": "tmall",
            "div_idx_actual_total_fee": fee,
        }
        order_rows.extend(_copies(rng, order, 0.15))
        r = rng.random()
        if r < 0.3:
            if r < 0.12:
                refund = -fee  # full refund
            elif r < 0.18:
                refund = -(fee - fee % 100) if fee >= 100 else -fee  # leaves < 1 yuan
            else:
                refund = -round(rng.uniform(0.1, 1.0) * fee, 2)
            refunded_at = pay_time + timedelta(seconds=rng.randint(60, 40_000))
            refund_rows.extend(
                _copies(
                    rng,
                    {
                        **{k: v for k, v in order.items() if k != "div_idx_actual_total_fee"},
                        "gmt_create": _ts(refunded_at),
                        "gmt_modified": _ts(refunded_at),
                        "pay_status": "4",
                        "refund_fee": refund,
                    },
                    0.1,
                )
            )
    return Dataset(_shuffle_nearby(rng, order_rows), _shuffle_nearby(rng, refund_rows))


def jsonl(records: list[dict]) -> Iterator[bytes]:
    for record in records:
        yield orjson.dumps(record)


def write(dataset: Dataset, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "orders.jsonl", out / "refunds.jsonl"
    for path, rows in zip(paths, (dataset.orders, dataset.refunds), strict=True):
        with path.open("wb") as f:
            for line in jsonl(rows):
                f.write(line + b"\n")
    return paths
