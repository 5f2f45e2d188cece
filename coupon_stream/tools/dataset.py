"""A deterministic demo dataset: orders and refunds with every case the service must handle.

Re-sent copies (identical but for a later gmt_modified, some placed before the original),
partial and full refunds, several days, totals that truncate to zero, and buyers whose day
ends at or below zero. Same `seed`, same files.

Buyers are drawn uniformly by default; `skew="zipf"` draws them by rank with weight
1/rank^1.1 (a few buyers with thousands of orders, most with one or two), and `skew="hot"`
gives a share `hot_share` of the orders to one buyer and draws the rest uniformly.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

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
FIRST_BUYER = 10_000_000
ZIPF_EXPONENT = 1.1
Skew = Literal["uniform", "zipf", "hot"]
SKEWS: tuple[Skew, ...] = ("uniform", "zipf", "hot")


@dataclass
class Dataset:
    orders: list[dict[str, Any]]
    refunds: list[dict[str, Any]]


def _ts(t: datetime) -> str:
    # The same text as t.strftime(FMT) for whole seconds (every time here), and faster.
    return t.isoformat(" ")


def _copies(rng: random.Random, record: dict[str, Any], share: float) -> list[dict[str, Any]]:
    """The record plus re-sent copies; a copy differs only in a later gmt_modified."""
    out = [record]
    if rng.random() < share:
        base = datetime.fromisoformat(record["gmt_modified"])  # as strptime(..., FMT)
        for k in range(rng.randint(1, 2)):
            copy = dict(record)
            copy["gmt_modified"] = _ts(base + timedelta(seconds=rng.randint(1, 600) * (k + 1)))
            out.append(copy)
    return out


def _shuffle_nearby(
    rng: random.Random, items: list[dict[str, Any]], window: int = 50
) -> list[dict[str, Any]]:
    """Local shuffle: copies usually follow their original but sometimes come first."""
    keyed = [(i + rng.uniform(0, window), item) for i, item in enumerate(items)]
    keyed.sort(key=lambda pair: pair[0])
    return [item for _, item in keyed]


@lru_cache(maxsize=4)
def _zipf_cumulative(n_buyers: int, exponent: float = ZIPF_EXPONENT) -> list[float]:
    """Cumulative weights 1/rank^exponent over ranks 1..n_buyers."""
    return list(accumulate(1.0 / rank**exponent for rank in range(1, n_buyers + 1)))


def _buyer_picker(
    rng: random.Random, skew: Skew, n_buyers: int, hot_share: float
) -> Callable[[], str]:
    """One buyer id per call, drawn with `rng` only (so the same seed, the same buyers).

    Uniform makes exactly one `rng.randrange(n_buyers)` call per order, as always: the
    uniform datasets stay what they were. Zipf: the buyer of rank r (from 0, the busiest
    first) is FIRST_BUYER + r. Hot: the hot buyer is FIRST_BUYER + n_buyers, one more than
    the uniform ones.
    """
    if skew == "uniform":
        return lambda: str(FIRST_BUYER + rng.randrange(n_buyers))
    if skew == "zipf":
        cumulative = _zipf_cumulative(n_buyers)
        total = cumulative[-1]
        last = n_buyers - 1
        return lambda: str(FIRST_BUYER + min(bisect_right(cumulative, rng.random() * total), last))
    if skew == "hot":
        hot = str(FIRST_BUYER + n_buyers)
        return lambda: (
            hot if rng.random() < hot_share else str(FIRST_BUYER + rng.randrange(n_buyers))
        )
    raise ValueError(f"skew must be one of {SKEWS}, not {skew!r}")


def generate(
    orders: int,
    seed: int = 7,
    buyers: int | None = None,
    skew: Skew = "uniform",
    hot_share: float = 0.3,
) -> Dataset:
    """`orders` orders (plus re-sent copies and refunds) over `buyers` buyers (orders // 4).

    `skew` says how buyers are drawn: "uniform", "zipf" (weight 1/rank^1.1) or "hot"
    (`hot_share` of the orders on one extra buyer, the rest uniform). The amounts, days,
    copies and refunds are drawn the same way whatever the skew.
    """
    if not 0.0 <= hot_share <= 1.0:
        raise ValueError(f"hot_share must be within [0, 1], not {hot_share}")
    rng = random.Random(seed)
    n_buyers = buyers or max(1, orders // 4)
    pick_buyer = _buyer_picker(rng, skew, n_buyers, hot_share)
    order_rows: list[dict[str, Any]] = []
    refund_rows: list[dict[str, Any]] = []
    for i in range(orders):
        buyer = pick_buyer()
        day = rng.choice(DAYS)
        pay_time = day + timedelta(seconds=rng.randrange(86_400))
        created = pay_time - timedelta(seconds=rng.randint(0, 900))
        fee: float = rng.choice(
            (rng.randint(1, 99), rng.randint(100, 50_000), rng.randint(100, 50_000))
        )
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


def jsonl(records: list[dict[str, Any]]) -> Iterator[bytes]:
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
