"""The demo dataset's buyer distributions: uniform (unchanged), Zipf-like and one hot buyer."""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter

import orjson
import pytest

from coupon_stream.tools.dataset import Dataset, generate, jsonl
from tests import reference


def orders_per_buyer(data: Dataset) -> Counter[str]:
    """Distinct orders per buyer (re-sent copies counted once)."""
    first = {o["biz_order_id"]: o["buyer_id"] for o in data.orders}
    return Counter(first.values())


def digest(data: Dataset) -> str:
    h = hashlib.sha256()
    for line in jsonl(data.orders):
        h.update(line + b"\n")
    h.update(b"--")
    for line in jsonl(data.refunds):
        h.update(line + b"\n")
    return h.hexdigest()[:16]


def test_uniform_is_what_it_always_was():
    # Digests of the output before the skews were added: existing tests depend on it.
    assert digest(generate(3000, seed=5)) == "988f9129d7d6f100"
    assert digest(generate(60, seed=3, buyers=12)) == "c1ec0b2ad3758924"
    assert generate(3000, seed=5, skew="uniform") == generate(3000, seed=5)


@pytest.mark.parametrize("skew", ["uniform", "zipf", "hot"])
def test_same_seed_same_data_other_seed_other_data(skew):
    assert generate(2000, seed=4, skew=skew) == generate(2000, seed=4, skew=skew)
    assert generate(2000, seed=4, skew=skew) != generate(2000, seed=5, skew=skew)


def test_hot_puts_the_share_on_one_buyer_and_spreads_the_rest():
    data = generate(20_000, seed=2, skew="hot")
    per_buyer = orders_per_buyer(data)
    (hot, hot_orders), (_, runner_up) = per_buyer.most_common(2)
    assert 0.28 < hot_orders / 20_000 < 0.32
    assert runner_up < 30
    assert hot == str(10_000_000 + 5000)  # outside the uniform buyers' range
    assert len({o["pay_time"][:10] for o in data.orders if o["buyer_id"] == hot}) == 3
    assert any(r["buyer_id"] == hot for r in data.refunds)
    share = generate(20_000, seed=2, skew="hot", hot_share=0.5)
    assert 0.48 < orders_per_buyer(share).most_common(1)[0][1] / 20_000 < 0.52


def test_zipf_has_a_few_heavy_buyers_and_many_light_ones():
    data = generate(100_000, seed=3, skew="zipf")
    per_buyer = orders_per_buyer(data)
    counts = sorted(per_buyer.values(), reverse=True)
    assert counts[0] > 5000  # thousands of orders on the busiest buyer
    assert counts[9] > 500
    assert counts[0] > 1000 * statistics.median(counts)
    assert sum(c <= 2 for c in counts) / len(counts) > 0.6  # most buyers: one or two orders
    assert per_buyer.most_common(1)[0][0] == "10000000"  # rank 1


def test_skews_keep_the_other_cases():
    for skew in ("zipf", "hot"):
        data = generate(5000, seed=6, skew=skew)
        ids = [o["biz_order_id"] for o in data.orders]
        assert len(ids) > len(set(ids)) == 5000  # re-sent copies
        assert 0.25 < len({r["biz_order_id"] for r in data.refunds}) / 5000 < 0.35
        assert {o["pay_time"][:10] for o in data.orders} == {
            "2026-11-11",
            "2026-11-12",
            "2026-11-13",
        }


def test_bad_arguments():
    with pytest.raises(ValueError, match="skew"):
        generate(10, skew="pareto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hot_share"):
        generate(10, skew="hot", hot_share=1.5)


def test_dataset_has_the_interesting_cases():
    data = generate(2000, seed=3)
    rows = reference.evaluate(data.orders, data.refunds)
    orders = {(o["biz_order_id"], o["pay_status"]) for o in data.orders}
    assert len(data.orders) > len(orders)  # re-sent copies
    assert any(r["refund_fee"] < 0 for r in data.refunds)
    keys = {(int(o["buyer_id"]), int(o["pay_time"][:10].replace("-", ""))) for o in data.orders}
    assert len(keys) > len(rows) > 0
    assert orjson.loads(next(jsonl(data.orders)))["buyer_id"]
